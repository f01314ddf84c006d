"""Synthetic head CT in HU with an intracranial mask and a hemorrhage label map.

The anatomy is built analytically in a head frame (x to the patient's left, y posterior, z
superior, millimetres, origin at the widest level of the cranial vault) and sampled on the
scanner grid after a random in-plane rotation and translation. Layers are placed with an
approximate distance to an ellipsoid, so scalp and skull keep a physical thickness whatever
the pixel size. Texture comes from smoothed noise computed on a coarse grid and interpolated,
which keeps a 256x256x32 study well under a second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ichseg.errors import ConfigError
from ichseg.volume import AIR_HU, HEMORRHAGE_CODES, SUBTYPES

MIN_SLICE_VOXELS = 10
"""A slice is positive for a subtype when it holds at least this many voxels of its code."""

BLEED_NAMES: tuple[str, ...] = tuple(HEMORRHAGE_CODES.values())
CODE_OF: dict[str, int] = {name: code for code, name in HEMORRHAGE_CODES.items()}

# Coarse grid for the noise fields; finer detail comes from the scanner noise.
_NOISE_GRID_MM = 2.5
# Convexity bleeds are painted last and never overlap earlier ones, so each stays one
# shell attached to the inner table.
_PAINT_ORDER = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")
_BLEED_ATTEMPTS = 8
_PSF_SIGMA_MM = 0.45

SCANNERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("GE MEDICAL SYSTEMS", "Revolution CT", ("STANDARD", "SOFT")),
    ("SIEMENS", "SOMATOM Definition AS", ("H30s", "J40s")),
    ("TOSHIBA", "Aquilion ONE", ("FC21", "FC26")),
    ("Philips", "Brilliance 64", ("UB", "UC")),
)
"""(Manufacturer, ManufacturerModelName, convolution kernels) a phantom study is attributed to."""
# Key of the random stream that draws the scanner, apart from the anatomy's stream, so that
# adding or changing scanner attributes never changes a study's pixels.
_SCANNER_STREAM = 2


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate.

    Args:
        size: in-plane pixels (rows = columns).
        num_slices: axial slices, slice 0 is the most inferior.
        slice_thickness_mm: slice thickness and spacing.
        pixel_spacing_mm: in-plane pixel size; None gives ``field_of_view_mm / size``.
        field_of_view_mm: reconstruction field of view used when pixel_spacing_mm is None.
        negative_fraction: probability that a study has no hemorrhage.
        max_bleeds: most hemorrhages in one positive study (at least one).
        noise_hu: standard deviation of the scanner noise.
        subtypes: hemorrhage subtypes that may be drawn (names of HEMORRHAGE_CODES).
        headrest_probability: probability of a plastic headrest below the head.
    """

    size: int = 256
    num_slices: int = 32
    slice_thickness_mm: float = 5.0
    pixel_spacing_mm: float | None = None
    field_of_view_mm: float = 230.0
    negative_fraction: float = 0.4
    max_bleeds: int = 3
    noise_hu: float = 6.0
    subtypes: tuple[str, ...] = BLEED_NAMES
    headrest_probability: float = 0.7

    def __post_init__(self) -> None:
        object.__setattr__(self, "subtypes", tuple(self.subtypes))
        if self.size < 16:
            raise ConfigError(f"phantom size must be at least 16 pixels, got {self.size}")
        if self.num_slices < 1:
            raise ConfigError(f"phantom num_slices must be positive, got {self.num_slices}")
        if self.slice_thickness_mm <= 0 or self.field_of_view_mm <= 0:
            raise ConfigError("phantom slice thickness and field of view must be positive")
        if self.pixel_spacing_mm is not None and self.pixel_spacing_mm <= 0:
            raise ConfigError("phantom pixel_spacing_mm must be positive")
        if not 0.0 <= self.negative_fraction <= 1.0:
            raise ConfigError("phantom negative_fraction must lie in [0, 1]")
        if self.max_bleeds < 1:
            raise ConfigError("phantom max_bleeds must be at least 1")
        if self.noise_hu < 0:
            raise ConfigError("phantom noise_hu must not be negative")
        unknown = [name for name in self.subtypes if name not in CODE_OF]
        if unknown:
            raise ConfigError(f"unknown hemorrhage subtypes {unknown}; choose from {BLEED_NAMES}")

    @property
    def spacing(self) -> float:
        """In-plane pixel size in mm."""
        # Rounded so that DICOM's decimal strings hold the exact value used for the affine.
        if self.pixel_spacing_mm is not None:
            return round(float(self.pixel_spacing_mm), 6)
        return round(float(self.field_of_view_mm) / self.size, 6)


@dataclass
class PhantomStudy:
    """One synthetic study with its ground truth.

    Attributes:
        hu: float32 ``(z, y, x)`` in HU, slice 0 inferior, row 0 anterior, column 0 right.
        intracranial_mask: uint8 0/1, everything inside the inner table of the skull.
        hemorrhage: uint8 label map, 0 none, codes of ``HEMORRHAGE_CODES``.
        pixel_spacing: (row, column) spacing in mm.
        slice_thickness: slice thickness (= spacing) in mm.
        first_position: LPS position of the first voxel of slice 0 (DICOM ImagePositionPatient).
        patient_age, patient_sex, study_date: demographics (drawn with the anatomy: age and sex
            shape the head).
        manufacturer, model_name, convolution_kernel, kvp, tube_current_ma: the scanner the
            study is attributed to. Headers only: drawn from a stream of their own and
            independent of pixels and labels, so a model can learn nothing from them.
        bleeds: one description per drawn hemorrhage (subtype, centre, voxels).
    """

    study_id: str
    patient_id: str
    seed: int
    hu: np.ndarray
    intracranial_mask: np.ndarray
    hemorrhage: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    first_position: tuple[float, float, float] | None = None
    patient_age: int = 50
    patient_sex: str = "M"
    study_date: str = "20240101"
    manufacturer: str = SCANNERS[0][0]
    model_name: str = SCANNERS[0][1]
    convolution_kernel: str = SCANNERS[0][2][0]
    kvp: float = 120.0
    tube_current_ma: int = 250
    bleeds: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.first_position is None:
            rows, cols = self.hu.shape[1:]
            self.first_position = (
                -(cols - 1) / 2 * float(self.pixel_spacing[1]),
                -(rows - 1) / 2 * float(self.pixel_spacing[0]),
                0.0,
            )

    @property
    def num_slices(self) -> int:
        return int(self.hu.shape[0])

    def slice_labels(self) -> np.ndarray:
        """Per-slice RSNA labels, ``(z, 6)`` uint8 in the order of ``SUBTYPES``."""
        nz = self.num_slices
        flat = self.hemorrhage.reshape(nz, -1).astype(np.int64)
        keys = (np.arange(nz, dtype=np.int64)[:, None] * 8 + flat).ravel()
        counts = np.bincount(keys, minlength=nz * 8).reshape(nz, 8)
        labels = np.zeros((nz, len(SUBTYPES)), dtype=np.uint8)
        for code, name in HEMORRHAGE_CODES.items():
            labels[:, SUBTYPES.index(name)] = counts[:, code] >= MIN_SLICE_VOXELS
        labels[:, 0] = labels[:, 1:].any(axis=1)
        return labels

    def subtypes_present(self) -> list[str]:
        """Subtypes positive on at least one slice, in ``SUBTYPES`` order (without ``any``)."""
        per_study = self.slice_labels().any(axis=0)
        return [name for name, on in zip(SUBTYPES[1:], per_study[1:], strict=True) if on]

    @property
    def positive(self) -> bool:
        return bool(self.slice_labels()[:, 0].any())


@dataclass
class _Head:
    scale: float
    axes: tuple[float, float, float, float]  # left-right, antero-posterior, up, down
    scalp: float
    skull: float
    theta: float
    shift: tuple[float, float]
    gm_hu: float
    wm_hu: float
    csf_hu: float
    csf_layer: float
    ventricle_scale: float
    headrest: bool


@dataclass
class _Grid:
    X: np.ndarray  # (1, n, n) head frame
    Y: np.ndarray  # (1, n, n) head frame
    Ys: np.ndarray  # (1, n, 1) scanner posterior coordinate, for gravity
    Xs: np.ndarray  # (1, 1, n) scanner left coordinate
    Z: np.ndarray  # (nz, 1, 1) head frame
    spacing: float
    thickness: float


@dataclass
class _Anatomy:
    hu: np.ndarray
    mask: np.ndarray
    d_in: np.ndarray
    depth: np.ndarray
    floor: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    lateral_ventricles: np.ndarray
    sulcal_wide: np.ndarray
    cisterns: np.ndarray
    sylvian: np.ndarray


def generate_study(seed: int, config: PhantomConfig | None = None) -> PhantomStudy:
    """Draw one synthetic head CT; the same seed and config give the same study.

    Args:
        seed: non-negative integer seed for ``numpy.random.default_rng``.
        config: what to generate; defaults to ``PhantomConfig()``.
    """
    cfg = config or PhantomConfig()
    if seed < 0:
        raise ConfigError(f"phantom seed must not be negative, got {seed}")
    rng = np.random.default_rng(seed)
    age = int(rng.integers(18, 91))
    sex = "M" if rng.random() < 0.5 else "F"
    study_date = f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    head = _draw_head(rng, cfg, age, sex)
    grid = _make_grid(rng, cfg, head)
    fields = _smooth_fields(rng, grid, cfg, correlations_mm=(5.0, 2.0, 18.0, 6.0))
    anatomy = _build_anatomy(rng, head, grid, fields)
    hemorrhage, bleeds = _draw_hemorrhages(rng, cfg, head, grid, anatomy, fields)

    # Scanner point spread in mm, in plane only (thick slices are already averaged along z);
    # on coarse test grids it vanishes instead of smearing bone into thin bleeds.
    sigma = _PSF_SIGMA_MM / grid.spacing
    hu = ndimage.gaussian_filter(anatomy.hu, sigma=(0.0, sigma, sigma), mode="nearest")
    if cfg.noise_hu > 0:
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(cfg.noise_hu)
    np.clip(hu, -1024.0, 3071.0, out=hu)

    # Rounded like the DICOM position strings, so headers and the affine agree exactly.
    first = (
        round(float(grid.Xs.ravel()[0]), 4),
        round(float(grid.Ys.ravel()[0]), 4),
        round(float(grid.Z.ravel()[0]), 4),
    )
    return PhantomStudy(
        study_id=f"PH{seed:06d}",
        patient_id=f"PT{seed:06d}",
        seed=int(seed),
        hu=hu.astype(np.float32, copy=False),
        intracranial_mask=anatomy.mask.astype(np.uint8),
        hemorrhage=hemorrhage,
        pixel_spacing=(grid.spacing, grid.spacing),
        slice_thickness=grid.thickness,
        first_position=first,
        patient_age=age,
        patient_sex=sex,
        study_date=study_date,
        bleeds=bleeds,
        **draw_scanner(seed),
    )


def draw_scanner(seed: int) -> dict[str, Any]:
    """The scanner attributes of study ``seed``: manufacturer, model, kernel, kVp and mA.

    Drawn from their own stream (``default_rng([seed, 2])``), not the anatomy's.

    Args:
        seed: the study seed.
    """
    rng = np.random.default_rng([seed, _SCANNER_STREAM])
    manufacturer, model, kernels = SCANNERS[int(rng.integers(len(SCANNERS)))]
    return {
        "manufacturer": manufacturer,
        "model_name": model,
        "convolution_kernel": kernels[int(rng.integers(len(kernels)))],
        "kvp": float(rng.choice([100.0, 120.0, 120.0, 140.0])),
        "tube_current_ma": int(rng.integers(15, 36)) * 10,
    }


def _draw_head(rng: np.random.Generator, cfg: PhantomConfig, age: int, sex: str) -> _Head:
    scale = float(np.clip(rng.normal(1.02 if sex == "M" else 0.97, 0.035), 0.88, 1.1))
    width = 73.0 * scale * rng.uniform(0.95, 1.05)
    length = 91.0 * scale * rng.uniform(0.95, 1.04)
    up = 66.0 * scale * rng.uniform(0.96, 1.04)
    headrest = bool(rng.random() < cfg.headrest_probability)
    # Leave room behind the head for the headrest inside the field of view.
    shift = (rng.uniform(-8.0, 8.0), rng.uniform(-8.0, 6.0) - (6.0 if headrest else 0.0))
    atrophy = (age - 18) / 72.0
    return _Head(
        scale=scale,
        axes=(width, length, up, 1.9 * up),
        scalp=rng.uniform(3.5, 6.0),
        skull=rng.uniform(5.0, 7.5),
        theta=np.deg2rad(rng.uniform(-15.0, 15.0)),
        shift=shift,
        gm_hu=rng.uniform(36.0, 42.0),
        wm_hu=rng.uniform(24.0, 29.0),
        csf_hu=rng.uniform(4.0, 10.0),
        csf_layer=0.8 + 1.6 * atrophy + rng.uniform(0.0, 0.4),
        ventricle_scale=0.8 + 0.45 * atrophy + rng.uniform(0.0, 0.15),
        headrest=headrest,
    )


def _make_grid(rng: np.random.Generator, cfg: PhantomConfig, head: _Head) -> _Grid:
    n, nz, sp, thk = cfg.size, cfg.num_slices, cfg.spacing, float(cfg.slice_thickness_mm)
    axis = ((np.arange(n) - (n - 1) / 2.0) * sp).astype(np.float32)
    xs, ys = axis[None, None, :], axis[None, :, None]
    cos, sin = np.float32(np.cos(head.theta)), np.float32(np.sin(head.theta))
    dx, dy = xs - np.float32(head.shift[0]), ys - np.float32(head.shift[1])
    # A short coverage sits on the ventricles; a long one ends a little above the vertex.
    span = (nz - 1) * thk
    top = min(head.axes[2] + rng.uniform(-3.0, 12.0), rng.uniform(-8.0, 12.0) + span / 2)
    z = (top - span + np.arange(nz) * thk).astype(np.float32)
    return _Grid(
        X=cos * dx + sin * dy,
        Y=-sin * dx + cos * dy,
        Ys=ys,
        Xs=xs,
        Z=z[:, None, None],
        spacing=float(sp),
        thickness=thk,
    )


def _interp_matrix(n_out: int, step_out: float, n_in: int, step_in: float) -> np.ndarray:
    """Linear interpolation weights from a coarse axis onto a fine one (same origin)."""
    pos = np.clip(np.arange(n_out) * step_out / step_in, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    frac = pos - lo
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    weights[rows, lo] = 1.0 - frac
    if n_in > 1:
        weights[rows, lo + 1] += frac
    return weights


def _smooth_fields(
    rng: np.random.Generator, grid: _Grid, cfg: PhantomConfig, correlations_mm: tuple[float, ...]
) -> list[np.ndarray]:
    """Unit-variance smoothed noise volumes, one per correlation length, on the study grid."""
    n, nz = cfg.size, cfg.num_slices
    g_xy = max(_NOISE_GRID_MM, grid.spacing)
    g_z = max(_NOISE_GRID_MM, grid.thickness)
    n_xy = int(np.ceil((n - 1) * grid.spacing / g_xy)) + 2
    n_z = int(np.ceil((nz - 1) * grid.thickness / g_z)) + 2 if nz > 1 else 1
    w_xy = _interp_matrix(n, grid.spacing, n_xy, g_xy)
    w_z = _interp_matrix(nz, grid.thickness, n_z, g_z)
    coarse = np.empty((len(correlations_mm), n_z, n_xy, n_xy), dtype=np.float32)
    for i, corr in enumerate(correlations_mm):
        white = rng.standard_normal((n_z, n_xy, n_xy), dtype=np.float32)
        smooth = ndimage.gaussian_filter(white, sigma=(corr / g_z, corr / g_xy, corr / g_xy))
        coarse[i] = smooth / max(float(smooth.std()), 1e-6)
    # One large GEMM per axis; numpy's batched matmul with a transposed operand can fall back
    # to a slow non-BLAS loop.
    k = len(correlations_mm)
    fine = (coarse.reshape(-1, n_xy) @ np.ascontiguousarray(w_xy.T)).reshape(k, n_z, n_xy, n)
    fine = np.einsum("yj,kzjx->kzyx", w_xy, fine, optimize=True)
    fine = np.einsum("zj,kjyx->kzyx", w_z, fine, optimize=True)
    return [np.ascontiguousarray(f, dtype=np.float32) for f in fine]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _segment_distance(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    ax, ay = a
    vx, vy = b[0] - ax, b[1] - ay
    t = np.clip(((x - ax) * vx + (y - ay) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(x - ax - t * vx, y - ay - t * vy)


def _ellipsoid(
    grid: _Grid, center: tuple[float, float, float], radii: tuple[float, float, float]
) -> np.ndarray:
    (cx, cy, cz), (rx, ry, rz) = center, radii
    inplane = ((grid.X - cx) / rx) ** 2 + ((grid.Y - cy) / ry) ** 2
    return inplane + ((grid.Z - cz) / rz) ** 2 < 1.0


def _skull_base_floor(X: np.ndarray, Y: np.ndarray, s: float, bumps: np.ndarray) -> np.ndarray:
    """Height of the cranial floor: the lowest of one bowl per fossa, plus petrous ridges.

    Taking the minimum of bowls leaves bony ridges where two fossae meet, and curved floors
    cut by axial slices give the islands of brain seen on low slices of a real head CT.
    """
    x, y = X / s, Y / s
    anterior = -27.0 + 0.006 * x**2 + 0.004 * (y + 50.0) ** 2
    # The clivus slopes steeply from the dorsum sellae down to the foramen magnum.
    ky = np.where(y < 25.0, 0.035, 0.012)
    posterior = -62.0 + 0.012 * x**2 + ky * (y - 25.0) ** 2
    floor = np.minimum(anterior, posterior)
    for side in (-1.0, 1.0):
        middle = -46.0 + 0.016 * ((x - side * 34.0) ** 2 + (y + 10.0) ** 2)
        floor = np.minimum(floor, middle)
    for side in (-1.0, 1.0):
        d = _segment_distance(x, y, (side * 14.0, -4.0), (side * 56.0, 16.0))
        floor = np.maximum(floor, -33.0 - 0.6 * d**2)
    return (floor * s + 1.5 * bumps).astype(np.float32)


def _build_anatomy(
    rng: np.random.Generator, head: _Head, grid: _Grid, fields: list[np.ndarray]
) -> _Anatomy:
    sulcal_noise, tex, coarse, blob = fields
    X, Y, Z, s = grid.X, grid.Y, grid.Z, head.scale
    a, b, c_up, c_low = head.axes
    cz = np.where(Z >= 0, np.float32(c_up), np.float32(c_low))
    r = np.sqrt((X / a) ** 2 + (Y / b) ** 2 + (Z / cz) ** 2)
    grad = np.sqrt((X / a**2) ** 2 + (Y / b**2) ** 2 + (Z / cz**2) ** 2)
    # First-order distance to the ellipsoid surface: exact along the axes, close elsewhere.
    d_out = (1.0 - r) / np.maximum(grad / np.maximum(r, 1e-6), 1.0 / c_low)
    del r, grad
    scalp = np.float32(head.scalp)
    skull = np.clip(head.skull + 0.9 * coarse, 3.5, 9.5).astype(np.float32)
    d_in = d_out - scalp - skull
    floor = _skull_base_floor(X, Y, s, coarse[coarse.shape[0] // 2])
    base_thickness = 8.0 * s
    above_base = floor - base_thickness
    foramen_r = np.hypot(X, Y - 16.0 * s)
    foramen = (foramen_r < 16.0 * s) & (Z > -62.0 * s - base_thickness - 2.0)
    inside = d_in > 0
    mask = inside & ((Z > floor) | foramen)

    hu = np.full(d_out.shape, AIR_HU, dtype=np.float32)

    if head.headrest:
        radius = rng.uniform(100.0, 140.0)
        thick = rng.uniform(3.0, 6.0)
        gap = rng.uniform(6.0, 14.0)
        back = head.shift[1] + np.hypot(a * np.sin(head.theta), b * np.cos(head.theta))
        cy = back + gap + thick / 2 - radius
        rho = np.hypot(grid.Xs - head.shift[0], grid.Ys - cy)
        arc = (np.abs(rho - radius) < thick / 2) & (grid.Ys - cy > radius * np.cos(1.2))
        # Air between head and headrest, as on a real pillow-free cradle.
        rest = arc & (d_out < -3.0)
        hu[rest] = rng.uniform(100.0, 300.0) + 8.0 * tex[rest]

    head_mask = d_out > 0
    hu[head_mask] = np.clip(40.0 + 7.0 * tex[head_mask], 20.0, 60.0)

    # Face and upper neck below the skull base.
    neck = (d_out > scalp) & (Z <= above_base)
    soft = 45.0 + 6.0 * tex
    for side in (-1.0, 1.0):
        orbit = _ellipsoid(grid, (side * 30 * s, -68 * s, -52 * s), (17 * s, 17 * s, 14 * s))
        globe = _ellipsoid(grid, (side * 30 * s, -70 * s, -52 * s), (11 * s, 11 * s, 11 * s))
        soft = np.where(orbit, -85.0 + 8.0 * tex, soft)
        soft = np.where(globe, 12.0 + 3.0 * tex, soft)
        maxillary = _ellipsoid(grid, (side * 24 * s, -48 * s, -82 * s), (14 * s, 16 * s, 15 * s))
        soft = np.where(maxillary, -950.0, soft)
    nasal = (np.abs(X) < 7.0 * s) & (Y < -40.0 * s) & (Y > -78.0 * s) & (Z < -45.0 * s)
    airway = (((X / (9 * s)) ** 2 + ((Y + 22 * s) / (6 * s)) ** 2) < 1) & (Z < -66.0 * s)
    soft = np.where(nasal | airway, -950.0, soft)
    canal = (foramen_r < 9.0 * s) & ~foramen
    vertebra = (foramen_r >= 9.0 * s) & (foramen_r < 15.0 * s) & (Z < -62.0 * s - base_thickness)
    soft = np.where(vertebra, 700.0 + 120.0 * tex, np.where(canal, 25.0 + 2.0 * tex, soft))
    hu[neck] = soft[neck]
    del soft

    # Skull vault (outer table, diploe, inner table) and the skull base slab.
    ring = (d_out > scalp) & (d_in <= 0) & (Z > above_base)
    depth_in_bone = (d_out - scalp) / skull
    cortical = (depth_in_bone < 0.27) | (depth_in_bone > 0.75)
    vault = np.where(
        cortical,
        np.clip(1280.0 + 110.0 * tex, 1050.0, 1500.0),
        np.clip(560.0 + 70.0 * tex, 420.0, 700.0),
    )
    slab = inside & (Z <= floor) & (Z > above_base) & ~foramen
    base_bone = np.clip(1000.0 + 220.0 * tex, 650.0, 1550.0)
    sinus = _ellipsoid(grid, (0.0, -16 * s, -47 * s), (13 * s, 11 * s, 9 * s))
    sinus |= (np.abs(X) < 13.0 * s) & (Y < -30.0 * s) & (blob > 0.2)
    sinus |= (np.abs(X) > 40.0 * s) & (Y > 0.0) & (Y < 30.0 * s) & (blob > 0.1)
    base_bone = np.where(sinus, -920.0 + 20.0 * tex, base_bone)
    hu[ring] = vault[ring]
    hu[slab] = base_bone[slab]
    del vault, base_bone, depth_in_bone, cortical, sinus

    brain = _build_brain(head, grid, d_in, floor, foramen, foramen_r, sulcal_noise, tex)
    hu[mask] = brain["hu"][mask]
    return _Anatomy(
        hu=hu,
        mask=mask,
        d_in=d_in,
        depth=brain["depth"],
        floor=floor,
        csf=brain["csf"] & mask,
        ventricles=brain["ventricles"] & mask,
        lateral_ventricles=brain["lateral"] & mask,
        sulcal_wide=brain["sulcal_wide"] & mask,
        cisterns=brain["cisterns"] & mask,
        sylvian=brain["sylvian"] & mask,
    )


def _build_brain(
    head: _Head,
    grid: _Grid,
    d_in: np.ndarray,
    floor: np.ndarray,
    foramen: np.ndarray,
    foramen_r: np.ndarray,
    sulcal_noise: np.ndarray,
    tex: np.ndarray,
) -> dict[str, np.ndarray]:
    X, Y, Z, s, vs = grid.X, grid.Y, grid.Z, head.scale, head.ventricle_scale
    above_floor = Z - floor
    # Distance to a sloping floor is shorter than the height above it.
    gy, gx = np.gradient(floor[0], grid.spacing)
    slope = np.sqrt(1.0 + gx**2 + gy**2).astype(np.float32)
    depth = np.minimum(d_in, above_floor / slope)
    depth = np.where(foramen & (above_floor <= 0), 16.0 * s - foramen_r, depth)

    # Sulci follow zero crossings of a smooth field; their width in mm is set by the gradient
    # of that field (about 1/correlation length), and kept at least about one pixel.
    corr = 5.0
    width = max(1.3, 0.8 * grid.spacing)
    a_noise = np.abs(sulcal_noise)
    sulcal_depth = 16.0 * s
    taper = np.clip(1.0 - depth / sulcal_depth, 0.0, 1.0)
    sulcus = a_noise < (0.5 * width / corr) * taper
    sulcal_wide = a_noise < (0.9 * max(width, 2.0) / corr) * taper
    gm_taper = np.clip(1.0 - depth / (sulcal_depth + 6.0), 0.0, 1.0)
    gray = (depth < head.csf_layer + 3.0) | (a_noise < (3.0 / corr) * gm_taper)
    surface_csf = depth < head.csf_layer

    hu = np.where(gray, head.gm_hu + 1.8 * tex, head.wm_hu + 1.3 * tex).astype(np.float32)
    gm_value = head.gm_hu + 1.8 * tex
    deep_gray = np.zeros(hu.shape, dtype=bool)
    for side in (-1.0, 1.0):
        deep_gray |= _ellipsoid(grid, (side * 9 * s, 8 * s, -2 * s), (7 * s, 11 * s, 9 * s))
        deep_gray |= _ellipsoid(grid, (side * 21 * s, -5 * s, -3 * s), (5 * s, 13 * s, 10 * s))
        deep_gray |= _ellipsoid(
            grid, (side * (9 + 3 * vs) * s, -20 * s, 8 * s), (4 * s, 8 * s, 9 * s)
        )
    hu = np.where(deep_gray, gm_value, hu)

    csf = surface_csf | sulcus
    cisterns = _ellipsoid(grid, (0.0, 8 * s, -17 * s), (17 * s, 17 * s, 8 * s))
    cisterns |= _ellipsoid(grid, (0.0, -8 * s, -20 * s), (10 * s, 8 * s, 5 * s))
    cisterns |= _ellipsoid(grid, (0.0, -1 * s, -40 * s), (11 * s, 6 * s, 14 * s))
    sylvian = np.zeros(hu.shape, dtype=bool)
    fissure = max(1.4, 0.6 * grid.spacing)
    z_band = (Z > -22.0 * s) & (Z < -1.0 * s)
    wiggle = Y + 3.0 * sulcal_noise
    for side in (-1.0, 1.0):
        line = _segment_distance(X, wiggle, (side * 22 * s, -10 * s), (side * 75 * s, 4 * s))
        sylvian |= (line < fissure) & z_band
    csf |= cisterns | sylvian

    stem = _ellipsoid(grid, (0.0, 10 * s, -17 * s), (12 * s, 10 * s, 9 * s))
    stem |= _ellipsoid(grid, (0.0, 9 * s, -40 * s), (13 * s, 11 * s, 16 * s))
    stem |= _ellipsoid(grid, (0.0, 15 * s, -64 * s), (8 * s, 8 * s, 16 * s))
    csf &= ~stem
    hu = np.where(stem, head.wm_hu + 4.0 + 1.5 * tex, hu)

    ventricles, lateral = _ventricles(grid, s, vs)
    csf |= ventricles

    # Interhemispheric fissure and falx above the tentorium, interrupted by the corpus
    # callosum and ventricles in the middle of the brain.
    central = ((Y + 3.0 * s) / (38.0 * s)) ** 2 + ((Z - 2.0 * s) / (30.0 * s)) ** 2 < 1.0
    falx_zone = ~central & (Z > -20.0 * s) & ~ventricles & (above_floor > 0)
    fissure_half = max(1.2, 0.5 * grid.spacing)
    csf |= falx_zone & (np.abs(X) < fissure_half)
    hu = np.where(csf, head.csf_hu + 1.0 * tex, hu)
    falx_profile = np.exp(-((X / 0.7) ** 2)) * falx_zone
    hu = hu + (70.0 - hu) * falx_profile
    return {
        "hu": hu.astype(np.float32, copy=False),
        "depth": depth,
        "csf": csf,
        "ventricles": ventricles,
        "lateral": lateral,
        "sulcal_wide": (sulcal_wide | surface_csf) & ~stem & ~ventricles,
        "cisterns": cisterns & ~stem,
        "sylvian": sylvian,
    }


def _ventricles(grid: _Grid, s: float, vs: float) -> tuple[np.ndarray, np.ndarray]:
    """Lateral ventricles (butterfly at mid levels) plus the third, fourth and temporal horns."""
    X, Y, Z = grid.X, grid.Y, grid.Z
    yy = Y / s
    bend = np.where(yy < -5.0, 0.0055, 0.0095) * (yy + 5.0) ** 2
    center_x = (4.5 * vs + bend) * s
    half_width = (
        2.3 + 3.2 * np.exp(-(((yy - 22.0) / 9.0) ** 2)) + 1.6 * np.exp(-(((yy + 24.0) / 7.0) ** 2))
    ) * vs
    vertical = np.clip(1.0 - ((Z - 10.0 * s) / (15.0 * s)) ** 2, 0.0, 1.0)
    extent = np.sqrt(vertical)
    along = np.abs(Y - 1.0 * s) < 35.0 * s * extent
    lateral = np.zeros(np.broadcast_shapes(X.shape, Z.shape), dtype=bool)
    for side in (-1.0, 1.0):
        lateral |= (np.abs(X - side * center_x) < half_width * s * extent) & along
    third = _ellipsoid(grid, (0.0, -4 * s, -6 * s), (1.6 * vs * s, 11 * s, 10 * s))
    fourth = _ellipsoid(grid, (0.0, 24 * s, -42 * s), (6 * s, 4 * s, 6 * s))
    temporal = np.zeros_like(lateral)
    for side in (-1.0, 1.0):
        temporal |= _ellipsoid(grid, (side * 30 * s, 2 * s, -24 * s), (2.5 * vs * s, 11 * s, 5 * s))
    return lateral | third | fourth | temporal, lateral


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[int, int, int] | None:
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return None
    k, i, j = np.unravel_index(int(flat[rng.integers(flat.size)]), candidates.shape)
    return int(k), int(i), int(j)


def _point(grid: _Grid, index: tuple[int, int, int]) -> tuple[float, float, float]:
    k, i, j = index
    return float(grid.X[0, i, j]), float(grid.Y[0, i, j]), float(grid.Z[k, 0, 0])


def _draw_hemorrhages(
    rng: np.random.Generator,
    cfg: PhantomConfig,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    labels = np.zeros(anat.hu.shape, dtype=np.uint8)
    bleeds: list[dict[str, Any]] = []
    if not cfg.subtypes or rng.random() < cfg.negative_fraction:
        return labels, bleeds
    count = int(rng.integers(1, cfg.max_bleeds + 1))
    allowed = list(cfg.subtypes)
    chosen = list(rng.choice(allowed, size=count, replace=count > len(allowed)))
    chosen.sort(key=_PAINT_ORDER.index)
    tex = fields[1]
    tissue = anat.mask & ~anat.csf
    for name in chosen:
        code = CODE_OF[name]
        for attempt in range(_BLEED_ATTEMPTS):
            drawn = _BLEED_DRAWERS[name](rng, head, grid, anat, fields, attempt)
            if drawn is None:
                continue
            region, edema, center = drawn
            region &= anat.mask
            if name in ("epidural", "subdural"):
                if (region & (labels > 0)).any():
                    continue
                region = _attached_to_table(region, anat, grid)
            region &= labels == 0
            if region.reshape(region.shape[0], -1).sum(axis=1).max() < MIN_SLICE_VOXELS:
                continue
            labels[region] = code
            base = rng.uniform(58.0, 78.0) if name != "subarachnoid" else rng.uniform(58.0, 70.0)
            anat.hu[region] = np.clip(base + 4.0 * tex[region], 50.0, 90.0)
            if edema is not None:
                rim = edema & tissue & (labels == 0)
                anat.hu[rim] = np.clip(rng.uniform(17.0, 23.0) + 2.0 * tex[rim], 12.0, 26.0)
            bleeds.append(
                {
                    "subtype": str(name),
                    "code": code,
                    "center_mm": [round(c, 1) for c in center],
                    "voxels": int(region.sum()),
                }
            )
            break
    labels[~anat.mask] = 0
    return labels, bleeds


def _attached_to_table(region: np.ndarray, anat: _Anatomy, grid: _Grid) -> np.ndarray:
    """Keep the parts of an extra-axial bleed that touch the inner table.

    Sampling a thin tapered shell on a coarse grid can leave detached specks.
    """
    components, count = ndimage.label(region)
    if count <= 1:
        return region
    touching = np.unique(components[region & (anat.d_in < max(1.5, grid.spacing))])
    return np.isin(components, touching[touching > 0])


_Drawn = tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]] | None


def _convexity_point(
    rng: np.random.Generator, grid: _Grid, anat: _Anatomy, s: float, min_abs_x: float
) -> tuple[int, int, int] | None:
    candidates = (
        anat.mask
        & (anat.d_in < max(1.5, 0.8 * grid.spacing))
        & (grid.Z - anat.floor > 8.0)
        & (grid.Z > -30.0 * s)
        & (np.abs(grid.X) > min_abs_x)
    )
    return _pick(rng, candidates)


def _lens_coordinate(
    grid: _Grid, anat: _Anatomy, center: tuple[float, float, float], radius: float, rz: float
) -> np.ndarray:
    """Squared normalised distance along the inner table from a point on it."""
    px, py, pz = center
    chord2 = (grid.X - px) ** 2 + (grid.Y - py) ** 2
    tangential = np.maximum(chord2 - np.maximum(anat.d_in, 0.0) ** 2, 0.0)
    return tangential / radius**2 + ((grid.Z - pz) / rz) ** 2


def _draw_epidural(
    rng: np.random.Generator,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
    attempt: int,
) -> _Drawn:
    index = _convexity_point(rng, grid, anat, head.scale, 12.0 * head.scale)
    if index is None:
        return None
    center = _point(grid, index)
    grow = 1.0 + 0.15 * attempt
    thickness = rng.uniform(7.0, 16.0) * grow
    rho2 = _lens_coordinate(
        grid, anat, center, rng.uniform(18.0, 30.0) * grow, rng.uniform(9.0, 16.0) * grow
    )
    # Biconvex: the inner border bulges into the brain (dura stripped off the bone).
    region = (rho2 < 1.0) & (anat.d_in < thickness * (1.0 - rho2))
    return region, None, center


def _draw_subdural(
    rng: np.random.Generator,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
    attempt: int,
) -> _Drawn:
    grow = 1.0 + 0.2 * attempt
    thickness = rng.uniform(3.0, 9.0) * grow
    if rng.random() < 0.2:
        # Interhemispheric subdural along the falx, starting at the inner table.
        cand = anat.mask & (np.abs(grid.X) < 2.5) & (anat.d_in < 2.0) & (grid.Z > 0.0)
        index = _pick(rng, cand)
        if index is None:
            return None
        center = _point(grid, index)
        side = 1.0 if rng.random() < 0.5 else -1.0
        length, height = rng.uniform(25.0, 50.0) * grow, rng.uniform(12.0, 25.0) * grow
        profile = 1.0 - ((grid.Y - center[1]) / length) ** 2 - ((grid.Z - center[2]) / height) ** 2
        offset = side * grid.X - 0.7
        region = (offset > 0) & (offset < max(thickness / 2, grid.spacing) * profile)
        return region, None, center
    index = _convexity_point(rng, grid, anat, head.scale, 20.0 * head.scale)
    if index is None:
        return None
    center = _point(grid, index)
    side = np.sign(center[0])
    rho2 = _lens_coordinate(
        grid, anat, center, rng.uniform(45.0, 75.0) * grow, rng.uniform(20.0, 40.0) * grow
    )
    # Crescent: nearly constant thickness along the convexity, stopped by the falx.
    region = (rho2 < 1.0) & (anat.d_in < thickness * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0)))
    region &= side * grid.X > 1.0
    return region, None, center


def _draw_intraparenchymal(
    rng: np.random.Generator,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
    attempt: int,
) -> _Drawn:
    cand = (
        anat.mask
        & ~anat.csf
        & (anat.depth > 12.0)
        & (anat.depth < 45.0)
        & (grid.Z - anat.floor > 10.0)
    )
    index = _pick(rng, cand)
    if index is None:
        return None
    center = _point(grid, index)
    radius = rng.uniform(6.0, 18.0) * head.scale * (1.0 + 0.15 * attempt)
    rz = radius * rng.uniform(0.7, 1.2)
    px, py, pz = center
    dist = np.sqrt(
        ((grid.X - px) ** 2 + (grid.Y - py) ** 2) / radius**2 + ((grid.Z - pz) / rz) ** 2
    )
    lumpy = dist + 0.22 * fields[3]
    region = (lumpy < 1.0) & ~anat.ventricles & (anat.depth > 2.0)
    edema = (lumpy < 1.0 + rng.uniform(4.0, 8.0) / radius) & ~region
    return region, edema, center


def _draw_intraventricular(
    rng: np.random.Generator,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
    attempt: int,
) -> _Drawn:
    lateral = anat.lateral_ventricles
    sides = [(-1.0,), (1.0,), (-1.0, 1.0)][int(rng.integers(3))]
    chosen = np.zeros_like(lateral)
    for side in sides:
        chosen |= lateral & (side * grid.X > 0)
    if not chosen.any():
        return None
    ys = np.broadcast_to(grid.Ys, chosen.shape)
    fill = min(0.9, rng.uniform(0.2, 0.45) * (1.3**attempt))
    # Blood settles in the dependent (posterior in a supine patient) part, with a flat level.
    level = np.quantile(ys[chosen], 1.0 - fill)
    region = chosen & (ys >= level)
    if rng.random() < 0.3:
        region |= _ellipsoid(grid, (0.0, -4 * head.scale, -6 * head.scale), (3, 11, 10)) & (
            anat.ventricles
        )
    index = _pick(rng, region)
    return region, None, _point(grid, index) if index else (0.0, 0.0, 0.0)


def _draw_subarachnoid(
    rng: np.random.Generator,
    head: _Head,
    grid: _Grid,
    anat: _Anatomy,
    fields: list[np.ndarray],
    attempt: int,
) -> _Drawn:
    basal = anat.cisterns | anat.sylvian
    if basal.any() and rng.random() < 0.4:
        region = anat.cisterns.copy()
        if rng.random() < 0.7:
            side = 1.0 if rng.random() < 0.5 else -1.0
            region |= anat.sylvian & (side * grid.X > 0)
        else:
            region |= anat.sylvian
        index = _pick(rng, region)
        return region, None, _point(grid, index) if index else (0.0, 0.0, 0.0)
    cand = anat.sulcal_wide & (anat.depth > 1.0) & (anat.depth < 8.0) & (grid.Z - anat.floor > 10)
    index = _pick(rng, cand)
    if index is None:
        return None
    center = _point(grid, index)
    grow = 1.0 + 0.25 * attempt
    radius, rz = rng.uniform(20.0, 35.0) * grow, rng.uniform(10.0, 20.0) * grow
    px, py, pz = center
    near = ((grid.X - px) ** 2 + (grid.Y - py) ** 2) / radius**2 + ((grid.Z - pz) / rz) ** 2 < 1
    return anat.sulcal_wide & near, None, center


_BLEED_DRAWERS = {
    "epidural": _draw_epidural,
    "intraparenchymal": _draw_intraparenchymal,
    "intraventricular": _draw_intraventricular,
    "subarachnoid": _draw_subarachnoid,
    "subdural": _draw_subdural,
}
