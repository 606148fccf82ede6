"""Synthetic grid-of-holes images with a known distortion (ground truth).

The model is a FReLoN-like CCD behind a fibre-optic taper, looking at a plate
of holes on a square lattice that is lit by X-rays. Units: lengths in pixels
(px) of the detector, intensities in ADU.

Coordinates and sign convention (the same as ccdgrid's maps and pyFAI's
``Detector.set_dx``/``set_dy``):

* Positions are ``(y, x)`` index coordinates: the centre of pixel ``(i, j)``
  is at ``(i, j)``, the pixel spans ``i - 0.5 .. i + 0.5``.
* The distortion ``d(p) = (dy, dx)`` is a function of the *detector* position
  ``p``; the true (ideal, undistorted) position of what is seen at ``p`` is
  ``p + d(p)``. A hole whose ideal lattice position is ``q`` therefore appears
  at the detector position ``p`` solving ``p + d(p) = q`` (Newton's method, to
  1e-9 px).
* Corner maps have shape ``(ny + 1, nx + 1)``; corner ``(i, j)`` is at index
  coordinates ``(i - 0.5, j - 0.5)``.

Image formation, in order:

1. **Ideal lattice** ``q(i, j) = origin + i * a1 + j * a2`` (px). ``a2`` has
   length ``pitch_px`` and makes the angle ``rotation_deg`` with the +x axis
   (positive towards +y); ``a1`` has length ``aspect * pitch_px`` and is
   perpendicular to ``a2`` up to ``shear_deg`` (the angle between them is
   ``90 + shear_deg`` degrees). So ``i`` counts holes along (about) y, ``j``
   along (about) x. ``origin`` is the image centre plus ``offset``.
2. **Distortion** (:class:`SyntheticDistortion`): a cubic polynomial (barrel or
   pincushion plus weaker random terms) and 24 random cosines with
   wavelengths of 0.7-4 image sides, with its affine part over the image
   removed (a calibration cannot see it: it fits its own lattice), scaled
   to a chosen peak ``|d|``:
   ``"none"`` 0 px, ``"frelon"`` 1.5 px, ``"strong"`` 20 px (like real FReLoN
   data, 2048²). Below 2048 px the preset peaks shrink with the image
   (``x min(ny, nx) / 2048``) so that the field keeps the gentle gradients of
   a real taper (local strain ``|dd/dp|`` up to ~5 %, ~2.5 % at 4096²);
   ``distortion_px`` sets the peak exactly (fields with strain > 25 % are
   refused).
3. **Holes**: plate discs of diameter ``hole_diameter_px`` mapped to the
   detector through the local affine approximation of the distortion at their
   centre (an ellipse whose centroid is exactly the hole's detector position),
   anti-aliased (edge pixels integrated exactly along x over 32 sub-rows),
   each with a ±3 % random brightness (keyed by its lattice index), peak
   ``signal`` ADU, then blurred by the PSF (a Gaussian of ``psf_sigma`` px
   plus an optional weak wide Gaussian tail).
4. **Detector**: the X-ray signal plus a weak scatter level (0.3 x
   ``background``) is multiplied by the fibre-bundle gain (hexagonal fibres
   of 6-9 px with 1 % gain spread and 3 % darker cladding, grouped in
   hexagonal multifibres of 7-10 fibres with 2 % gain spread whose wavy
   "chicken-wire" boundaries transmit 0-15 % less, mostly a few %, a few
   clearly darker), by the vignetting ``(1 + a r**2)**-2``
   (``a`` = 0.25-0.35, ``r`` in units of the half-size) and by the taper
   transmission (1 inside a rounded square of half-extent 0.95 x the half
   size and corner radius 0.3 x that, or a circle of radius 0.95 x the
   smaller half-size, off-centre by up to 0.5 %; 0 outside; a 2 px linear
   ramp across the edge), then added to a smooth background of mean
   ``background`` ADU present everywhere, also outside the taper.
5. **Noise**: with a multiplier ``m`` (``"low"`` 0.3, ``"normal"`` 1,
   ``"heavy"`` 3, ``"none"`` 0): Poisson statistics with ``m**2`` ADU per
   detected quantum, plus Gaussian read noise of ``2.5 m`` ADU.
6. **Defects**: hot pixels (70 % single, 30 % clusters of 2-3 pixels, half of
   them saturated at 65535, the rest between 1.5 x ``signal`` and 65535) and
   dead rows/columns (value 0).
7. **Output**: rounded and clipped to ``uint16`` (default) or left as float.

Sizes: ``frelon_2048`` and ``frelon_4096`` both use a 98 px pitch, i.e. the
4096² image is a larger detector with the same pixel size and about four
times as many holes (~1700), not the 2048² plate at a finer sampling.

What the images ask of a calibration (measured with ``frelon_2048(seed=2)``,
387 visible holes): a background-subtracted centroid in a 9 px radius
recovers the hole positions to 0.026 px RMS (0.11 px max) with the default
detector model, 0.007 px RMS (0.011 max) without the fibre pattern -- the
per-fibre and per-multifibre gain steps across a hole bias its centroid, as
on a real taper without flat-field correction. A 4096² image takes ~3 s of
CPU and ~0.26 GB peak memory (2-core machine).

Randomness: ``seed`` feeds a :class:`numpy.random.SeedSequence` whose
independent children draw the distortion, the lattice offset, the detector
(taper, fibres, background), the hole brightnesses, the noise and the
defects. The same seed gives the same image; changing only ``noise`` or the
defects keeps the distortion and the lattice. No global random state is used.
"""

import numbers
from dataclasses import dataclass, field

import numpy as np

from ._synthetic_field import SyntheticDistortion, random_distortion
from ._synthetic_render import DetectorResponse, render_holes
from .errors import CcdgridError

__all__ = [
    "DenseResidual",
    "Lattice",
    "SyntheticDistortion",
    "SyntheticGrid",
    "dense_residual",
    "frelon_2048",
    "frelon_4096",
    "grid_image",
    "make_distortion",
]

DISTORTION_PRESETS = {"none": 0.0, "frelon": 1.5, "strong": 20.0}
_PRESET_REFERENCE_SIZE = 2048  # below this size the preset peaks shrink linearly
NOISE_PRESETS = {"none": 0.0, "low": 0.3, "normal": 1.0, "heavy": 3.0}
_READ_NOISE = 2.5  # ADU at noise multiplier 1
_SCATTER = 0.3  # lit-area scatter level, in units of `background`
_HOLE_BRIGHTNESS_SPREAD = 0.03
_MAX_STRAIN = 0.25  # beyond this the "grid" would no longer look like a lattice
_SATURATION = 65535.0
_BLOCK_ROWS = 256  # rows composed at a time (bounds the temporaries)
# child streams of the SeedSequence, by purpose
_STREAM_DISTORTION, _STREAM_LATTICE, _STREAM_DETECTOR = 0, 1, 2
_STREAM_HOLES, _STREAM_NOISE, _STREAM_DEFECTS = 3, 4, 5
_N_STREAMS = 6


@dataclass(frozen=True)
class Lattice:
    """Ideal hole lattice ``q(i, j) = origin + i * a1 + j * a2`` in (y, x) px.

    Attributes
    ----------
    origin : ndarray of shape (2,), float64, px
        Ideal position of hole ``(0, 0)``.
    a1, a2 : ndarray of shape (2,), float64, px
        Lattice vectors; ``a1`` points along about +y, ``a2`` along about +x.
    """

    origin: np.ndarray
    a1: np.ndarray
    a2: np.ndarray

    @property
    def matrix(self):
        """``(2, 2)`` float64 matrix whose columns are ``a1`` and ``a2``."""
        return np.stack([self.a1, self.a2], axis=1)

    def ideal(self, indices):
        """Ideal ``(y, x)`` positions, ``(N, 2)`` float64 px, of integer ``(i, j)`` indices."""
        ij = np.asarray(indices, dtype=np.float64).reshape(-1, 2)
        return self.origin + ij @ self.matrix.T


@dataclass
class SyntheticGrid:
    """A synthetic grid image with its ground truth.

    Attributes
    ----------
    image : ndarray of shape (ny, nx), uint16 or float
        The image, ADU.
    truth : SyntheticDistortion
        The distortion field ``d``: ``truth.displacement(points)`` gives
        ``(dy, dx)`` at any ``(y, x)`` detector points, ``truth.corner_maps(shape)``
        the ``(ny + 1, nx + 1)`` corner maps.
    holes : ndarray of shape (M, 2), float64, px
        True detector ``(y, x)`` positions of every hole whose centre lies in
        the image (``-0.5 <= y < ny - 0.5``, same for x), visible or not.
    indices : ndarray of shape (M, 2), int64
        Lattice indices ``(i, j)``: ``i`` along ``lattice.a1`` (about y),
        ``j`` along ``lattice.a2`` (about x).
    ideal : ndarray of shape (M, 2), float64, px
        Ideal ``(y, x)`` positions; ``holes + truth.displacement(holes) == ideal``.
    visible : ndarray of shape (M,), bool
        Fully visible and clear of the edges: the whole hole plus a margin of
        ``2 + 3 * psf_sigma`` px is inside both the fully lit taper area and
        the image. Safe for accuracy tests.
    cut : ndarray of shape (M,), bool
        Partly visible: part of the hole lies on the taper's edge ramp, in
        the dark outside it, or beyond the image border (its centroid is
        biased). Holes that are neither ``visible`` nor ``cut`` are either
        whole but within the margin of an edge, or entirely dark.
    taper_mask : ndarray of shape (ny, nx), bool
        Pixels whose centre is inside the lit taper area.
    pitch_px : float
        Nominal lattice pitch, px.
    lattice : Lattice
        Ideal lattice.
    params : dict
        Every parameter used, resolved (presets turned into numbers, the
        drawn offset, ...), including ``seed``.
    defects : dict
        ``"hot_pixels"`` (K, 2) int64 (y, x) of every hot pixel,
        ``"dead_rows"`` and ``"dead_cols"`` int64 arrays.
    """

    image: np.ndarray
    truth: SyntheticDistortion
    holes: np.ndarray
    indices: np.ndarray
    ideal: np.ndarray
    visible: np.ndarray
    cut: np.ndarray
    taper_mask: np.ndarray
    pitch_px: float
    lattice: Lattice
    params: dict = field(default_factory=dict)
    defects: dict = field(default_factory=dict)


def make_distortion(shape, distortion="frelon", distortion_px=None, seed=0):
    """Draw the distortion field :func:`grid_image` would use.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)`` of the image.
    distortion : {"frelon", "strong", "none"}
        Preset peak ``|d|``: 1.5, 20 or 0 px (scaled by ``min(ny, nx) / 2048``
        below 2048 px).
    distortion_px : float or None, px
        Exact peak ``|d|`` over the image, overriding the preset's.
    seed : int or None
        Same meaning as in :func:`grid_image`; the same seed and shape give
        the same field as the image's ``truth``.

    Returns
    -------
    SyntheticDistortion
    """
    shape = _check_shape(shape)
    peak = _resolve_distortion(shape, distortion, distortion_px)
    streams = np.random.SeedSequence(_check_seed(seed)).spawn(_N_STREAMS)
    truth = random_distortion(shape, peak, np.random.default_rng(streams[_STREAM_DISTORTION]))
    _check_strain(truth, shape, peak)
    return truth


def grid_image(
    shape=(2048, 2048),
    *,
    pitch_px=98.0,
    hole_diameter_px=10.5,
    rotation_deg=0.5,
    shear_deg=0.0,
    aspect=1.005,
    offset=None,
    distortion="frelon",
    distortion_px=None,
    psf_sigma=1.0,
    psf_tail=0.0,
    psf_tail_sigma=8.0,
    signal=3000.0,
    background=50.0,
    noise="normal",
    taper=True,
    fibre_pattern=True,
    vignetting=True,
    hot_pixels=0,
    dead_rows=0,
    dead_cols=0,
    dtype=np.uint16,
    seed=0,
):
    """Generate a grid-of-holes image with its ground-truth distortion.

    See the module docstring for the physical model and the conventions.

    Parameters
    ----------
    shape : tuple of 2 int
        ``(ny, nx)``, each >= 16.
    pitch_px : float, px
        Nominal hole spacing (length of ``a2``), > 0.
    hole_diameter_px : float, px
        Hole diameter on the plate, in ``(0, pitch_px)``.
    rotation_deg : float, degrees
        Angle of ``a2`` from the +x axis, towards +y; ``|rotation_deg| <= 45``.
    shear_deg : float, degrees
        Departure of the angle between ``a1`` and ``a2`` from 90 degrees;
        ``|shear_deg| < 10``. Nonzero models a plate that is not square (or
        pixel axes that are not orthogonal): :func:`ccdgrid.calibrate`
        assumes a square plate, as real ones are, and corrects such a shear
        as the detector's distortion, which this truth does not hold.
    aspect : float
        ``|a1| / |a2|`` (pixel aspect ratio), in ``[0.8, 1.25]``.
    offset : pair of float or None, px
        ``(y, x)`` of hole ``(0, 0)``'s ideal position relative to the image
        centre ``((ny - 1) / 2, (nx - 1) / 2)``. None draws it uniformly in
        ``[-pitch/2, pitch/2)`` from ``seed``.
    distortion : {"frelon", "strong", "none"}
        Distortion preset (peak ``|d|`` 1.5, 20, 0 px; see the module notes).
    distortion_px : float or None, px
        Exact peak ``|d|`` over the image, overriding the preset's.
    psf_sigma : float, px
        Standard deviation of the Gaussian PSF core; 0 for none.
    psf_tail : float
        Fraction of the flux in a wide Gaussian tail, in ``[0, 1)``.
    psf_tail_sigma : float, px
        Standard deviation of that tail.
    signal : float, ADU
        Value of a fully open pixel of a hole (before vignetting, fibre gain
        and noise), > 0.
    background : float, ADU
        Mean smooth background present everywhere, >= 0.
    noise : {"none", "low", "normal", "heavy"} or float
        Noise level, or its multiplier ``m >= 0`` (see the module notes).
    taper : bool or {"square", "circle"}
        Lit area: True or "square" for a rounded square, "circle", or False
        for the whole image.
    fibre_pattern : bool or float
        Apply the fibre-bundle gain pattern; a number scales its contrast
        (True = 1).
    vignetting : bool
        Apply the fall-off of intensity towards the edges.
    hot_pixels : int
        Number of hot-pixel events (single pixels or 2-3 pixel clusters).
    dead_rows, dead_cols : int
        Number of whole rows / columns set to 0.
    dtype : {numpy.uint16, numpy.float32, numpy.float64}
        Output type; uint16 values are rounded and clipped to 0..65535.
    seed : int or None
        Seed of all randomness. None draws fresh entropy, recorded in
        ``params["seed"]`` so that the image can be made again.

    Returns
    -------
    SyntheticGrid

    Raises
    ------
    CcdgridError
        For an invalid argument (the message names it), or a distortion so
        strong for the image size that its gradient exceeds 0.25 somewhere.

    Examples
    --------
    >>> from ccdgrid.synthetic import grid_image
    >>> res = grid_image((256, 256), seed=1)
    >>> res.image.shape, res.image.dtype.name
    ((256, 256), 'uint16')
    >>> import numpy as np
    >>> bool(np.allclose(res.holes + res.truth.displacement(res.holes), res.ideal))
    True
    """
    ny, nx = shape = _check_shape(shape)
    pitch_px = _positive("pitch_px", pitch_px)
    hole_diameter_px = _positive("hole_diameter_px", hole_diameter_px)
    if hole_diameter_px >= pitch_px:
        raise CcdgridError(
            f"`hole_diameter_px` ({hole_diameter_px}) must be smaller than `pitch_px` ({pitch_px})"
        )
    rotation_deg = _finite("rotation_deg", rotation_deg, -45.0, 45.0)
    shear_deg = _finite("shear_deg", shear_deg, -10.0, 10.0, open_ends=True)
    aspect = _finite("aspect", aspect, 0.8, 1.25)
    psf_sigma = _finite("psf_sigma", psf_sigma, 0.0, 50.0)
    psf_tail = _finite("psf_tail", psf_tail, 0.0, 1.0)
    if psf_tail >= 1.0:
        raise CcdgridError(f"`psf_tail` must be < 1, got {psf_tail}")
    psf_tail_sigma = _positive("psf_tail_sigma", psf_tail_sigma)
    signal = _positive("signal", signal)
    background = _finite("background", background, 0.0, np.inf)
    noise_mult = _resolve_noise(noise)
    taper_kind = _resolve_taper(taper)
    fibre_strength = _resolve_switch("fibre_pattern", fibre_pattern)
    hot_pixels = _count("hot_pixels", hot_pixels, ny * nx)
    dead_rows = _count("dead_rows", dead_rows, ny)
    dead_cols = _count("dead_cols", dead_cols, nx)
    out_dtype = _resolve_dtype(dtype)
    peak = _resolve_distortion(shape, distortion, distortion_px)
    seed = _check_seed(seed)
    if offset is not None:
        offset = np.asarray(offset, dtype=np.float64)
        if offset.shape != (2,) or not np.all(np.isfinite(offset)):
            raise CcdgridError(f"`offset` must be a finite (y, x) pair or None, got {offset!r}")

    root = np.random.SeedSequence(seed)
    seed = root.entropy  # with seed=None, the drawn entropy: params["seed"] reproduces the image
    streams = [np.random.default_rng(s) for s in root.spawn(_N_STREAMS)]
    truth = random_distortion(shape, peak, streams[_STREAM_DISTORTION])
    _check_strain(truth, shape, peak)
    if offset is None:
        offset = streams[_STREAM_LATTICE].uniform(-pitch_px / 2, pitch_px / 2, size=2)
    lattice = _make_lattice(shape, pitch_px, rotation_deg, shear_deg, aspect, offset)
    response = DetectorResponse(
        shape,
        streams[_STREAM_DETECTOR],
        taper=taper_kind,
        fibres=fibre_strength,
        vignetting=bool(vignetting),
        background=background,
    )

    # Every hole that can put light into the image: ideal positions within the
    # image grown by the hole size, the PSF and the largest displacement.
    radius = hole_diameter_px / 2.0
    reach = radius * aspect + 4.0 * max(psf_sigma, psf_tail_sigma if psf_tail > 0 else 0.0)
    reach += peak + 2.0
    indices = _indices_covering(
        lattice, (-0.5 - reach, ny - 0.5 + reach, -0.5 - reach, nx - 0.5 + reach)
    )
    ideal = lattice.ideal(indices)
    holes = truth.detector_position(ideal)
    jac = truth.jacobian(holes)
    jac[:, 0, 0] += 1.0
    jac[:, 1, 1] += 1.0
    # detector offset -> ideal offset (I + J) -> plate offset (pitch * A^-1)
    forms = pitch_px * np.linalg.inv(lattice.matrix) @ jac
    extent = radius * np.linalg.norm(np.linalg.inv(forms), ord=2, axis=(1, 2))
    edge_dist = response.point_distance(holes[:, 0], holes[:, 1])
    lit_any = edge_dist - extent < response.edge_width / 2  # some light gets through

    # Looked up by lattice index, so a hole keeps its brightness whatever
    # other parameters change which holes are enumerated.
    table = streams[_STREAM_HOLES].standard_normal(1 << 16)
    brightness = (
        1.0 + _HOLE_BRIGHTNESS_SPREAD * table[((indices[:, 0] & 255) << 8) | (indices[:, 1] & 255)]
    )
    signal_img = np.zeros(shape, dtype=np.float32)
    render_holes(
        signal_img,
        holes[lit_any],
        forms[lit_any],
        radius,
        signal * np.clip(brightness[lit_any], 0.0, None),
        psf_sigma,
        psf_tail,
        psf_tail_sigma,
    )

    image, taper_mask = _compose(
        signal_img, response, background, noise_mult, out_dtype, streams[_STREAM_NOISE]
    )
    del signal_img
    defects = _add_defects(
        image, streams[_STREAM_DEFECTS], hot_pixels, dead_rows, dead_cols, signal
    )
    keep = _inside_image(holes, 0.0, shape)
    keep &= (holes[:, 0] < ny - 0.5) & (holes[:, 1] < nx - 0.5)  # half-open pixel range
    visible, cut = _classify(holes, extent, edge_dist, response.edge_width, psf_sigma, shape)

    params = {
        "shape": shape,
        "pitch_px": pitch_px,
        "hole_diameter_px": hole_diameter_px,
        "rotation_deg": rotation_deg,
        "shear_deg": shear_deg,
        "aspect": aspect,
        "offset": tuple(float(v) for v in offset),
        "distortion": distortion,
        "distortion_px": peak,
        "psf_sigma": psf_sigma,
        "psf_tail": psf_tail,
        "psf_tail_sigma": psf_tail_sigma,
        "signal": signal,
        "background": background,
        "noise": noise,
        "noise_multiplier": noise_mult,
        "read_noise_adu": _READ_NOISE * noise_mult,
        "taper": taper_kind,
        "fibre_pattern": fibre_strength,
        "fibre_pitch_px": response.fibre_pitch,
        "multifibre_pitch_px": response.multi_pitch,
        "vignetting": bool(vignetting),
        "hot_pixels": hot_pixels,
        "dead_rows": dead_rows,
        "dead_cols": dead_cols,
        "dtype": out_dtype.name,
        "seed": seed,
    }
    return SyntheticGrid(
        image=image,
        truth=truth,
        holes=holes[keep],
        indices=indices[keep],
        ideal=ideal[keep],
        visible=visible[keep],
        cut=cut[keep],
        taper_mask=taper_mask,
        pitch_px=pitch_px,
        lattice=lattice,
        params=params,
        defects=defects,
    )


def frelon_2048(seed=0, **kwargs):
    """A 2048² FReLoN-like grid image: 98 px pitch, 10.5 px holes, strong distortion.

    Keyword arguments override :func:`grid_image`'s (``distortion`` defaults
    to ``"strong"``, ~20 px peak, like real FReLoN data).
    """
    kwargs.setdefault("distortion", "strong")
    return grid_image((2048, 2048), seed=seed, **kwargs)


def frelon_4096(seed=0, **kwargs):
    """A 4096² FReLoN-like grid image with the same 98 px pitch (~1700 holes).

    The same pixel size as :func:`frelon_2048` on a detector twice as wide;
    keyword arguments override :func:`grid_image`'s (``distortion`` defaults
    to ``"strong"``).
    """
    kwargs.setdefault("distortion", "strong")
    return grid_image((4096, 4096), seed=seed, **kwargs)


# -- dense residual --------------------------------------------------------


@dataclass
class DenseResidual:
    """Error of recovered corner maps against the truth, between the holes.

    Attributes
    ----------
    rms : float, px
        ``sqrt(mean(ry**2 + rx**2))`` over the points, after removing the
        best affine part.
    max : float, px
        Largest ``sqrt(ry**2 + rx**2)``.
    rms_y, rms_x : float, px
        RMS of each component.
    points : ndarray of shape (n, 2), float64, px
        The ``(y, x)`` points drawn.
    residuals : ndarray of shape (n, 2), float64, px
        ``(ry, rx)`` at the points (interpolated minus true, affine removed).
    affine : ndarray of shape (2, 3), float64
        The removed part: ``r_c ≈ affine[c] @ (1, Y, X)`` at the true positions ``(Y, X)``.
    """

    rms: float
    max: float
    rms_y: float
    rms_x: float
    points: np.ndarray
    residuals: np.ndarray
    affine: np.ndarray


def dense_residual(truth, dy, dx, mask=None, *, region=None, n=20000, remove_affine=True, seed=0):
    """Measure recovered corner maps against a true field at random points.

    This is what the accuracy targets mean: the error of the maps *between*
    the holes, where users' pixels are, not only at the holes.

    Parameters
    ----------
    truth : object with ``displacement(points) -> (N, 2)``
        The true field, e.g. ``SyntheticGrid.truth``.
    dy, dx : array_like of shape (ny + 1, nx + 1), float, px
        Recovered corner maps (corner ``(i, j)`` at ``(i - 0.5, j - 0.5)``),
        in the :func:`grid_image` sign convention.
    mask : array_like of shape (ny, nx) or None
        Pixel mask, **non-zero = invalid** (pyFAI's convention); such pixels
        get no points. Points inside pixels that touch a NaN corner are skipped
        too.
    region : array_like of shape (ny, nx), bool, or None
        Pixels allowed, **True = valid** (e.g. ``SyntheticGrid.taper_mask``);
        None = all.
    n : int
        Number of points, drawn uniformly among the valid pixels and
        uniformly inside each pixel.
    remove_affine : bool
        Subtract, per component, the least-squares fit ``a + b Y + c X`` of
        the residual, ``(Y, X) = p + d_true(p)`` the true position of the
        point: a calibration can only recover the field up to an affine map
        of the corrected positions (the lattice it is measured against is
        itself fitted), and a map of positions, unlike one of the points
        ``p``, also absorbs the average magnification and rotation that the
        lattice convention moves between the pixel size and the maps
        (``(S - I) d_true``, up to 0.2 px under a 60 px barrel).
    seed : int
        Seed of the point draw.

    Returns
    -------
    DenseResidual

    Raises
    ------
    CcdgridError
        If the shapes disagree or no pixel is valid.
    """
    dy = np.asarray(dy, dtype=np.float64)
    dx = np.asarray(dx, dtype=np.float64)
    if dy.ndim != 2 or dy.shape != dx.shape or min(dy.shape) < 2:
        raise CcdgridError(
            f"`dy` and `dx` must be corner maps of one shape (ny + 1, nx + 1), "
            f"got {dy.shape} and {dx.shape}"
        )
    ny, nx = dy.shape[0] - 1, dy.shape[1] - 1
    valid = np.ones((ny, nx), dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (ny, nx):
            raise CcdgridError(f"`mask` must have shape {(ny, nx)}, got {mask.shape}")
        valid &= mask == 0
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != (ny, nx):
            raise CcdgridError(f"`region` must have shape {(ny, nx)}, got {region.shape}")
        valid &= region
    bad = ~(np.isfinite(dy) & np.isfinite(dx))
    if bad.any():
        valid &= ~(bad[:-1, :-1] | bad[1:, :-1] | bad[:-1, 1:] | bad[1:, 1:])
    if not isinstance(n, numbers.Integral) or n < 1:
        raise CcdgridError(f"`n` must be a positive int, got {n!r}")
    flat = np.flatnonzero(valid)
    if flat.size == 0:
        raise CcdgridError("no valid pixel to measure the residual on")
    rng = np.random.default_rng(seed)
    pick = flat[rng.integers(0, flat.size, size=n)]
    iy, ix = np.divmod(pick, nx)
    points = np.stack([iy + rng.uniform(-0.5, 0.5, n), ix + rng.uniform(-0.5, 0.5, n)], axis=1)

    # corner (i, j) sits at (i - 0.5, j - 0.5): fractional corner index = p + 0.5
    fy = points[:, 0] + 0.5 - iy
    fx = points[:, 1] + 0.5 - ix
    recovered = np.stack([_bilinear(m, iy, ix, fy, fx) for m in (dy, dx)], axis=1)
    true = truth.displacement(points)
    resid = recovered - true
    # the affine map is one of positions (corrected against true), not of
    # displacements: fitted over p + d_true, it absorbs the convention of the
    # lattice a calibration measures against (which average magnification
    # and rotation it leaves in the maps), so any convention measures alike
    at = points + true
    design = np.stack([np.ones(n), at[:, 0], at[:, 1]], axis=1)
    affine = np.zeros((2, 3))
    if remove_affine:
        centre = at.mean(axis=0)
        scaled = design.copy()
        scaled[:, 1:] -= centre  # conditioning
        coef, *_ = np.linalg.lstsq(scaled, resid, rcond=None)
        resid = resid - scaled @ coef
        affine = coef.T.copy()
        affine[:, 0] -= affine[:, 1:] @ centre
    norm2 = (resid**2).sum(axis=1)
    return DenseResidual(
        rms=float(np.sqrt(norm2.mean())),
        max=float(np.sqrt(norm2.max())),
        rms_y=float(np.sqrt((resid[:, 0] ** 2).mean())),
        rms_x=float(np.sqrt((resid[:, 1] ** 2).mean())),
        points=points,
        residuals=resid,
        affine=affine,
    )


def _bilinear(corner_map, iy, ix, fy, fx):
    """Bilinear interpolation of a corner map inside pixel (iy, ix) at fractions (fy, fx)."""
    c00 = corner_map[iy, ix]
    c10 = corner_map[iy + 1, ix]
    c01 = corner_map[iy, ix + 1]
    c11 = corner_map[iy + 1, ix + 1]
    return (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy


# -- helpers -----------------------------------------------------------------


def _make_lattice(shape, pitch, rotation_deg, shear_deg, aspect, offset):
    ny, nx = shape
    theta = np.deg2rad(rotation_deg)
    phi = theta + np.deg2rad(shear_deg)
    a2 = pitch * np.array([np.sin(theta), np.cos(theta)])
    a1 = pitch * aspect * np.array([np.cos(phi), -np.sin(phi)])
    origin = np.array([(ny - 1) / 2.0, (nx - 1) / 2.0]) + offset
    return Lattice(origin=origin, a1=a1, a2=a2)


def _compose(signal_img, response, background, noise_mult, out_dtype, rng):
    """Detector response, background, noise and quantisation, block by block.

    ``signal_img`` (float32, the PSF-blurred holes) is used as scratch space.
    Returns the image in ``out_dtype`` and the taper mask (bool).
    """
    ny = signal_img.shape[0]
    image = np.empty(signal_img.shape, dtype=out_dtype)
    taper_mask = np.empty(signal_img.shape, dtype=bool)
    for y0 in range(0, ny, _BLOCK_ROWS):
        y1 = min(ny, y0 + _BLOCK_ROWS)
        lit, gain, bg = response.block(y0, y1)
        taper_mask[y0:y1] = lit > 0.5
        sig = signal_img[y0:y1]
        sig += np.float32(_SCATTER * background)
        sig *= gain
        sig *= lit
        sig += bg
        if noise_mult > 0:
            quantum = noise_mult**2
            sig = rng.poisson(sig / quantum).astype(np.float32) * np.float32(quantum)
            sig += rng.normal(0.0, _READ_NOISE * noise_mult, sig.shape).astype(np.float32)
        if out_dtype == np.uint16:
            np.clip(np.rint(sig), 0, _SATURATION, out=sig)
        image[y0:y1] = sig
    return image, taper_mask


def _classify(holes, extent, edge_dist, edge_width, psf_sigma, shape):
    """(visible, cut) flags of the holes, see :class:`SyntheticGrid`.

    visible: the disc plus a margin lies in the fully lit area and in the
    image; cut: part of the disc is on the taper's ramp, in the dark, or
    beyond the image border (and some of it is lit).
    """
    half_ramp = edge_width / 2
    lit_any = edge_dist - extent < half_ramp
    margin = 2.0 + 3.0 * psf_sigma
    visible = _inside_image(holes, extent + margin, shape)
    visible &= edge_dist + extent + margin <= -half_ramp
    cut = lit_any & ((edge_dist + extent > -half_ramp) | ~_inside_image(holes, extent, shape))
    return visible, cut


def _check_strain(truth, shape, peak):
    strain = truth.max_strain(shape)
    if strain > _MAX_STRAIN:
        raise CcdgridError(
            f"`distortion_px` = {peak:g} is too strong for a {shape[0]}x{shape[1]} image: "
            f"the local strain reaches {strain:.2f} (at most {_MAX_STRAIN} allowed)"
        )


def _inside_image(points, room, shape):
    """Whether the disc of radius ``room`` around each point is inside the image."""
    y, x = points[:, 0], points[:, 1]
    return (
        (y - room >= -0.5)
        & (y + room <= shape[0] - 0.5)
        & (x - room >= -0.5)
        & (x + room <= shape[1] - 0.5)
    )


def _indices_covering(lattice, box):
    """All (i, j) whose ideal position lies in ``box = (y0, y1, x0, x1)``, (K, 2) int64."""
    y0, y1, x0, x1 = box
    corners = np.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]]) - lattice.origin
    ij = np.linalg.solve(lattice.matrix, corners.T).T
    lo = np.floor(ij.min(axis=0)).astype(np.int64) - 1
    hi = np.ceil(ij.max(axis=0)).astype(np.int64) + 1
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    idx = np.stack([ii.ravel(), jj.ravel()], axis=1)
    q = lattice.ideal(idx)
    inside = (q[:, 0] >= y0) & (q[:, 0] <= y1) & (q[:, 1] >= x0) & (q[:, 1] <= x1)
    return idx[inside]


def _add_defects(image, rng, hot_pixels, dead_rows, dead_cols, signal):
    ny, nx = image.shape
    hot = []
    for _ in range(hot_pixels):
        y, x = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        size = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        if rng.random() < 0.5:
            value = _SATURATION
        else:
            value = rng.uniform(min(1.5 * signal, _SATURATION), _SATURATION)
        pixels = [(y, x)]
        while len(pixels) < size:
            dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[int(rng.integers(0, 4))]
            py, px = pixels[-1][0] + dy, pixels[-1][1] + dx
            # shape >= 16 x 16: the walk always has a free neighbour
            if 0 <= py < ny and 0 <= px < nx and (py, px) not in pixels:
                pixels.append((py, px))
        for py, px in pixels:
            image[py, px] = value
        hot.extend(pixels)
    # Dead lines where they matter: inside the lit area (the central 90 %).
    rows = _draw_lines(rng, ny, dead_rows)
    cols = _draw_lines(rng, nx, dead_cols)
    image[rows, :] = 0
    image[:, cols] = 0
    return {
        "hot_pixels": np.array(hot, dtype=np.int64).reshape(-1, 2),
        "dead_rows": rows,
        "dead_cols": cols,
    }


def _draw_lines(rng, size, count):
    lo, hi = int(0.05 * size), int(np.ceil(0.95 * size))
    pool = np.arange(lo, hi) if hi - lo >= count else np.arange(size)
    return np.sort(rng.choice(pool, size=count, replace=False)).astype(np.int64)


def _check_shape(shape):
    try:
        dims = tuple(shape)
    except TypeError:
        raise CcdgridError(f"`shape` must be a pair of ints (ny, nx), got {shape!r}") from None
    if len(dims) != 2 or not all(isinstance(v, numbers.Integral) for v in dims):
        raise CcdgridError(f"`shape` must be a pair of ints (ny, nx), got {shape!r}")
    if min(dims) < 16:
        raise CcdgridError(f"`shape` must be at least (16, 16), got {shape!r}")
    return int(dims[0]), int(dims[1])


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise CcdgridError(f"`seed` must be a non-negative int or None, got {seed!r}")
    return int(seed)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CcdgridError(f"`{name}` must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise CcdgridError(f"`{name}` must be finite, got {value!r}")
    return value


def _positive(name, value):
    value = _real(name, value)
    if value <= 0:
        raise CcdgridError(f"`{name}` must be > 0, got {value!r}")
    return value


def _finite(name, value, lo, hi, open_ends=False):
    value = _real(name, value)
    bad = not (lo < value < hi) if open_ends else not (lo <= value <= hi)
    if bad:
        brackets = "()" if open_ends else "[]"
        raise CcdgridError(
            f"`{name}` must be in {brackets[0]}{lo}, {hi}{brackets[1]}, got {value!r}"
        )
    return value


def _count(name, value, limit):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CcdgridError(f"`{name}` must be a non-negative int, got {value!r}")
    if value > limit:
        raise CcdgridError(f"`{name}` must be at most {limit}, got {value!r}")
    return int(value)


def _resolve_noise(noise):
    if isinstance(noise, str):
        if noise not in NOISE_PRESETS:
            raise CcdgridError(
                f"`noise` must be one of {sorted(NOISE_PRESETS)} or a number >= 0, got {noise!r}"
            )
        return NOISE_PRESETS[noise]
    return _finite("noise", noise, 0.0, np.inf)


def _resolve_switch(name, value):
    """True -> 1.0, False -> 0.0, a number in [0, 10] -> itself (a contrast multiplier)."""
    if value is True or value is False:
        return float(value)
    return _finite(name, value, 0.0, 10.0)


def _resolve_taper(taper):
    if taper is True or taper == "square":
        return "square"
    if taper == "circle":
        return "circle"
    if taper is False or taper is None:
        return None
    raise CcdgridError(f"`taper` must be True, False, 'square' or 'circle', got {taper!r}")


def _resolve_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise CcdgridError(f"`dtype` must be uint16, float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.uint16), np.dtype(np.float32), np.dtype(np.float64)):
        raise CcdgridError(f"`dtype` must be uint16, float32 or float64, got {dt}")
    return dt


def _resolve_distortion(shape, distortion, distortion_px):
    if distortion_px is not None:
        return _finite("distortion_px", distortion_px, 0.0, np.inf)
    if distortion not in DISTORTION_PRESETS:
        raise CcdgridError(
            f"`distortion` must be one of {sorted(DISTORTION_PRESETS)}, got {distortion!r}"
        )
    return DISTORTION_PRESETS[distortion] * min(1.0, min(shape) / _PRESET_REFERENCE_SIZE)
