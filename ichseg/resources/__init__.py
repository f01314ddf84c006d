"""Data files shipped with ichseg (bundle schema and templates)."""
