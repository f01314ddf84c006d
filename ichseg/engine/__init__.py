"""Training, evaluation and the ablation ladder: the machinery that turns configs into runs."""
