"""Simulate one synthetic T1 scan from the template anatomy.

A subject is the template anatomy (:mod:`.anatomy`) warped by an individual head size and a smooth
random deformation, aged to its *biological* age (:mod:`.ageing`), and imaged by its site's scanner
(contrast curve, blur, bias field, Rician noise, gain). Two output modes:

* standard (default): skull-stripped and already on the 2 mm MNI grid (91 x 109 x 91), like the
  UK Biobank ``T1_brain_to_MNI`` inputs of the paper;
* raw: an unprocessed scan with scalp, skull and background noise, misplaced by a random rigid
  motion, on the site's own voxel grid and orientation, with a strong bias field; the ground-truth
  raw-to-MNI affine and brain mask are returned so that preprocessing can be scored.

All randomness comes from ``SubjectSpec.seed`` (a NumPy ``SeedSequence`` entropy tuple), so the
same spec always gives the same array.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from . import ageing
from .anatomy import CHANNELS, TemplateAnatomy
from .grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE

__all__ = ["SiteProfile", "SubjectSpec", "SimulatedScan", "simulate_subject", "raw_grid"]

_BASE_CONTRAST = {"csf": 0.20, "gm": 0.62, "wm": 1.0, "lesion": 0.55}
_HEAD_LAYERS_MM = ((2.5, 0.20), (8.0, 0.07), (13.0, 0.95), (15.0, 0.45))  # outer edge, intensity
_RAW_FOV_MM = np.array([224.0, 256.0, 240.0])
_LESION_THRESHOLD = 3.1


@dataclass(frozen=True)
class SiteProfile:
    """A site (scanner and recruitment) of the synthetic cohort.

    Attributes
    ----------
    name : str
        Site label written to ``participants.tsv`` (``site1``, ``site2``, ...).
    gain : float
        Intensity scale in arbitrary scanner units (white matter ~ gain).
    gamma : float
        Exponent of the contrast curve applied to the normalised intensity, around 1.
    noise : float
        Standard deviation of the Rician noise as a fraction of ``gain``.
    blur_mm : float
        Standard deviation in mm of the Gaussian point-spread function.
    bias : float
        Standard deviation of the log bias field (0.05 = about 5 % gain variation).
    gm_contrast : float
        Multiplier of the grey-matter intensity (changes the grey/white contrast).
    age_mean, age_sd : float
        Recruitment age distribution in years (truncated to the cohort's age range).
    raw_voxel_mm : tuple of float
        Voxel size of the site's raw scans.
    raw_orientation : str
        Axis codes of the raw voxel array, e.g. ``"LPS"`` or ``"ASL"`` (sagittal).
    """

    name: str
    gain: float
    gamma: float
    noise: float
    blur_mm: float
    bias: float
    gm_contrast: float
    age_mean: float
    age_sd: float
    raw_voxel_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    raw_orientation: str = "LPS"

    def to_dict(self) -> dict:
        """Plain-dict form for JSON / TSV output."""
        d = asdict(self)
        d["raw_voxel_mm"] = list(self.raw_voxel_mm)
        return d


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that defines one synthetic subject.

    Attributes
    ----------
    participant_id : str
    age : float
        Chronological age in years: the label.
    biological_age : float
        Age the image is generated from: ``age + N(0, sigma_gap)``.
    sex : {"F", "M"}
    site : str
    head_scale : float
        Linear brain size relative to MNI (about 1 +- 0.04; males 2 % larger).
    ventricle_factor : float
        Individual multiplier of age-related ventricle growth (log-normal, sd 0.1).
    ventricle_offset_mm : float
        Individual ventricle size independent of age, in mm of boundary shift.
    cortex_factor : float
        Individual multiplier of cortical atrophy (log-normal, sd 0.1).
    seed : tuple of int
        Entropy of the subject's ``SeedSequence`` (deformation, lesions, bias, noise).
    """

    participant_id: str
    age: float
    biological_age: float
    sex: str
    site: str
    head_scale: float
    ventricle_factor: float
    ventricle_offset_mm: float
    cortex_factor: float
    seed: tuple[int, ...] = field(default=(0,))


@dataclass
class SimulatedScan:
    """One simulated scan.

    Attributes
    ----------
    data : numpy.ndarray, int16
        The image (standard: 91 x 109 x 91; raw: the site's grid).
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-world affine of ``data`` (standard: MNI mm; raw: scanner mm).
    brain_mask : numpy.ndarray of bool
        Ground-truth brain mask on the same grid as ``data``.
    truth : dict
        Ground-truth measures: tissue volumes in ml (``gm_ml``, ``wm_ml``, ``csf_ml``,
        ``ventricle_ml``, ``lesion_ml``, ``brain_ml``) in the subject's own space.
    raw_to_mni : numpy.ndarray of shape (4, 4) or None
        Raw mode only: the affine taking scanner mm to MNI template mm (the linear part of the
        ground truth; the residual non-linear deformation is a few mm).
    """

    data: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    truth: dict
    raw_to_mni: np.ndarray | None = None


def raw_grid(site: SiteProfile) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a site's raw voxel grid (centred on the scanner origin).

    The field of view is 224 x 256 x 240 mm (left-right, posterior-anterior, inferior-superior),
    the voxel axes follow ``site.raw_orientation``.
    """
    codes = site.raw_orientation.upper()
    axis_of = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    if len(codes) != 3 or any(c not in axis_of for c in codes) or len({axis_of[c][0] for c in codes}) != 3:
        raise ValueError(f"raw_orientation must be three axis codes covering R/L, A/P, S/I, got {codes!r}")
    direction = np.zeros((3, 3))
    shape = []
    for k, c in enumerate(codes):
        world_axis, sign = axis_of[c]
        direction[world_axis, k] = sign
        shape.append(int(round(_RAW_FOV_MM[world_axis] / site.raw_voxel_mm[k])))
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(site.raw_voxel_mm)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return (shape[0], shape[1], shape[2]), affine


def _voxel_to_grid(shape: tuple[int, int, int], linear: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """``linear @ ijk + offset`` for every voxel index of ``shape``, as a (X, Y, Z, 3) tensor."""
    lin = torch.as_tensor(linear, dtype=torch.float32)
    out = torch.as_tensor(offset, dtype=torch.float32).expand(*shape, 3).clone()
    for axis, n in enumerate(shape):
        idx = torch.arange(n, dtype=torch.float32)
        view = [1, 1, 1, 3]
        view[axis] = n
        out += (idx[:, None] * lin[:, axis][None, :]).reshape(view)
    return out


def _grid_sample_points(volumes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of ``volumes`` (C, X, Y, Z) at normalised (x, y, z) points (..., 3)."""
    pts = grid.reshape(1, 1, 1, -1, 3).flip(-1)  # grid_sample wants (W, H, D) = (z, y, x) order
    out = F.grid_sample(volumes.unsqueeze(0), pts, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(volumes.shape[0], *grid.shape[:-1])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian random field on a coarse grid, smoothed and rescaled to unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return (f / max(float(f.std()), 1e-8)).astype(np.float32)


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of a (C, x, y, z) coarse field to (C, *shape)."""
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32)).unsqueeze(0)
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0]


def simulate_subject(anatomy: TemplateAnatomy, subject: SubjectSpec, site: SiteProfile, *, raw: bool = False,
                     deform_mm: float = 1.25) -> SimulatedScan:
    """Simulate one subject's T1 scan.

    Parameters
    ----------
    anatomy : TemplateAnatomy
        From :func:`fedsparse_lib.data.anatomy.load_template_anatomy`.
    subject : SubjectSpec
    site : SiteProfile
    raw : bool, default False
        Unprocessed scan (scalp, skull, misplacement, site grid) instead of the skull-stripped
        2 mm MNI-space image.
    deform_mm : float, default 1.25
        Standard deviation in mm of the smooth random deformation (individual anatomy).

    Returns
    -------
    SimulatedScan
    """
    if site.name != subject.site:
        raise ValueError(f"subject {subject.participant_id} belongs to {subject.site!r}, not {site.name!r}")
    rng = np.random.default_rng(np.random.SeedSequence(list(subject.seed)))
    shape_t = np.asarray(anatomy.channels.shape[1:])
    lo = anatomy.affine[:3, 3]
    span = np.diag(anatomy.affine)[:3] * (shape_t - 1)
    centre = np.asarray(anatomy.centre_mm, dtype=float)
    s = subject.head_scale

    # --- output grid and the affine map output voxel -> subject mm -----------------------------
    raw_to_mni = None
    if raw:
        out_shape, out_affine = raw_grid(site)
        rot = _rotation(np.deg2rad(rng.uniform(-12.0, 12.0, size=3)))
        shift = rng.uniform(-15.0, 15.0, size=3)
        # subject mm = centre + R (p - shift): the brain centre sits at `shift` in scanner mm
        to_subject = np.eye(4)
        to_subject[:3, :3] = rot
        to_subject[:3, 3] = centre - rot @ shift
        raw_to_mni = np.eye(4)
        raw_to_mni[:3, :3] = rot / s
        raw_to_mni[:3, 3] = centre - rot @ shift / s
    else:
        # standard images are affinely registered to MNI: head size is normalised away, and only
        # the box around the template brain is simulated (the rest is background)
        box, out_shape, out_affine = _mni_brain_box(anatomy)
        to_subject = np.eye(4)
        s = 1.0
    # template mm = centre + (subject mm - centre) / s + displacement; normalised to [-1, 1]
    scale_t = np.eye(4)
    scale_t[:3, :3] /= s
    scale_t[:3, 3] = centre - centre / s
    norm = np.eye(4)
    norm[:3, :3] = np.diag(2.0 / span)
    norm[:3, 3] = -2.0 * lo / span - 1.0
    vox_to_norm = norm @ scale_t @ to_subject @ out_affine
    grid = _voxel_to_grid(out_shape, vox_to_norm[:3, :3], vox_to_norm[:3, 3])
    # individual anatomy: smooth random deformation (mm), expressed in normalised units
    disp = _upsample(rng.normal(0.0, deform_mm, size=(3, 6, 7, 6)), out_shape)
    grid += disp.permute(1, 2, 3, 0) * torch.as_tensor(2.0 / span, dtype=torch.float32)
    del disp
    lesion_field = _upsample(_smooth_field(rng, (1, 18, 21, 18), sigma=(0, 1.0, 1.0, 1.0)), out_shape)[0]

    # --- sample the template channels (only where there is brain, unless raw) ---------------
    chans = torch.from_numpy(anatomy.channels)
    names = list(CHANNELS if raw else CHANNELS[:-1])
    brain_full = _grid_sample_points(chans[2:3], grid)[0]
    roi = torch.ones(out_shape, dtype=torch.bool) if raw else brain_full > 1e-4
    pts = grid[roi]
    del grid
    rest = [i for i, n in enumerate(names) if n != "brain"]
    sampled = _grid_sample_points(chans[rest], pts)
    ch = {names[i]: sampled[k] for k, i in enumerate(rest)}
    ch["brain"] = brain_full[roi]
    z = lesion_field[roi]

    # --- ageing at the biological age (on the region's voxels) ----------------------------------
    bio = subject.biological_age
    gm, wm, brain, d_vent = ch["gm"], ch["wm"], ch["brain"], ch["d_vent"]
    rv = max(float(ageing.ventricle_expansion_mm(bio)) * subject.ventricle_factor + subject.ventricle_offset_mm, 0.0)
    grow = 1.0 - torch.exp(-torch.relu(rv - d_vent) / 0.7)
    gm = gm * (1.0 - grow)
    wm = wm * (1.0 - grow)
    rs = float(ageing.cortical_atrophy_mm(bio)) * subject.cortex_factor
    thin = 1.0 - torch.exp(-torch.relu(rs * ch["regional"] - ch["d_sulc"]) / 0.6)
    gm = gm * (1.0 - thin)
    csf = torch.clamp(brain - gm - wm, min=0.0)
    tau = _LESION_THRESHOLD - 1.0 * torch.exp(-torch.relu(d_vent) / 10.0) - float(ageing.lesion_threshold_shift(bio))
    lesion = torch.sigmoid((z - tau) / 0.25) * wm

    # --- tissue contrast -------------------------------------------------------------------------
    jitter = rng.normal(1.0, 0.02, size=3)
    c_csf = _BASE_CONTRAST["csf"] * jitter[0]
    c_gm = _BASE_CONTRAST["gm"] * site.gm_contrast * jitter[1]
    c_wm = _BASE_CONTRAST["wm"] * float(ageing.wm_intensity_factor(bio)) * jitter[2]
    signal = csf * c_csf + gm * c_gm + (wm - lesion) * c_wm + lesion * _BASE_CONTRAST["lesion"]
    if raw:
        thickness = _upsample(_smooth_field(rng, (1, 6, 7, 6), sigma=(0, 1.0, 1.0, 1.0)), out_shape)[0][roi]
        signal = signal + (1.0 - brain) * _head_signal(ch["d_head"] * s / (1.0 + 0.12 * thickness))

    # volumes in the subject's native space (standard images were shrunk or grown by 1 / s)
    voxel_ml = float(abs(np.linalg.det(out_affine[:3, :3]))) / 1000.0 * (1.0 if raw else subject.head_scale**3)
    def total(t: torch.Tensor) -> float:
        # float64 sum rounded to 1e-6 ml: torch's SIMD and scalar paths differ in the last float32
        # bit, and which voxels take which path depends on the thread count
        return round(float(t.numpy().sum(dtype=np.float64)) * voxel_ml, 6)

    truth = {
        "gm_ml": total(gm),
        "wm_ml": total(wm),
        "csf_ml": total(csf),
        "ventricle_ml": total(csf * (d_vent < rv + 1.0)),
        "lesion_ml": total(lesion),
        "brain_ml": total(brain),
    }
    brain_mask = (brain_full > 0.5).numpy()
    image = torch.zeros(out_shape, dtype=torch.float32)
    image[roi] = signal
    del gm, wm, csf, lesion, grow, thin, sampled, ch, signal, brain_full

    # --- the scanner -----------------------------------------------------------------------------
    img = image.numpy()
    voxel_mm = np.sqrt((out_affine[:3, :3] ** 2).sum(axis=0))
    if site.blur_mm > 0.05:
        img = ndi.gaussian_filter(img, sigma=site.blur_mm / voxel_mm, mode="constant")
    bias_sd = site.bias * (2.5 if raw else 1.0)
    log_bias = _upsample(_smooth_field(rng, (1, 5, 5, 5), sigma=(0, 0.8, 0.8, 0.8)) * bias_sd, out_shape)[0]
    gain = site.gain * float(np.exp(rng.normal(0.0, 0.3)))  # arbitrary per-scan scaling
    sigma = np.float32(site.noise * site.gain)
    # skull-stripped images are exactly 0 outside the brain: only the brain's voxels are imaged
    where = slice(None) if raw else brain_mask
    vals = img[where] * np.exp(log_bias.numpy()[where])
    vals = np.power(np.clip(vals, 0.0, None), site.gamma) * np.float32(gain)
    noise = rng.standard_normal((2,) + vals.shape, dtype=np.float32) * sigma
    vals = np.sqrt((vals + noise[0]) ** 2 + noise[1] ** 2)
    out = np.zeros(out_shape, dtype=np.float32)
    out[where] = vals
    data = np.clip(np.rint(out), 0, np.iinfo(np.int16).max).astype(np.int16)
    if not raw:
        full = np.zeros(MNI_2MM_SHAPE, dtype=np.int16)
        full[box] = data
        full_mask = np.zeros(MNI_2MM_SHAPE, dtype=bool)
        full_mask[box] = brain_mask
        data, brain_mask, out_affine = full, full_mask, np.array(MNI_2MM_AFFINE)
    return SimulatedScan(data=data, affine=out_affine, brain_mask=brain_mask, truth=truth, raw_to_mni=raw_to_mni)


_BOX_CACHE: dict[int, tuple] = {}


def _mni_brain_box(anatomy: TemplateAnatomy, margin: int = 6) -> tuple[tuple[slice, ...], tuple[int, int, int], np.ndarray]:
    """Slices of the 2 mm MNI grid around the template brain (+ ``margin`` voxels), with its affine."""
    key = id(anatomy.channels)
    if key not in _BOX_CACHE:
        brain = anatomy.channel("brain") > 1e-3
        pad = int(round((MNI_2MM_AFFINE[0, 3] - anatomy.affine[0, 3]) / 2.0))
        slices = []
        for axis, n in enumerate(MNI_2MM_SHAPE):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(brain.any(axis=other)) - pad
            slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, n)))
        shape = tuple(sl.stop - sl.start for sl in slices)
        affine = np.array(MNI_2MM_AFFINE)
        affine[:3, 3] += affine[:3, :3] @ np.array([sl.start for sl in slices], dtype=float)
        _BOX_CACHE[key] = (tuple(slices), shape, affine)
    return _BOX_CACHE[key]


def _head_signal(d_head: torch.Tensor) -> torch.Tensor:
    """T1 signal of the tissue outside the brain (CSF rim, skull, scalp fat, skin) by distance (mm)."""
    signal = torch.zeros_like(d_head)
    inner = 0.0
    for outer, value in _HEAD_LAYERS_MM:
        signal = signal + value * torch.sigmoid((d_head - inner) / 0.4) * torch.sigmoid((outer - d_head) / 0.4)
        inner = outer
    return signal


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from x, y, z Euler angles in radians (applied x, then y, then z)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx
