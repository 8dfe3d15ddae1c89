"""KTC2023 entry interface: reconstruct every dataN.mat of a folder against its ref.mat.

    python scripts/ktc2023.py INPUT_DIR OUTPUT_DIR LEVEL [--model CHECKPOINT] [--linearised [--sigma0 fit] ...]

INPUT_DIR holds ref.mat (the empty tank: Injref, Mpat, Uelref) and data1.mat, data2.mat, ...; LEVEL (1..7)
is the difficulty level (electrodes 1 .. 2(LEVEL - 1) removed). Writes OUTPUT_DIR/N.mat with
``reconstruction``: a 256 x 256 uint8 image, 0 water, 1 resistive, 2 conductive (the challenge's format).
Default: the shipped network and its learned segmenter (deepunroll/realdata/models/ktc2023_default.pt, both
trained on simulation only; docs/ktc_learned.md says which and how it was chosen). ``--linearised``: the reference method's
linearised difference step with its settings (docs/real_tanks.md) on our own tank mesh.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch

from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_learned import DEFAULT_MODEL, SEGMENTATIONS, KTCLearnedReconstructor
from deepunroll.realdata.ktc_reconstruct import MESH_CHOICES, KTCReconstructor, KTCSettings, data_files


LINEARISED_ONLY = ("mesh", "mesh_root", "h0", "sigma0", "contact_impedance", "gauss_newton_steps")


def parse(argv: list[str]) -> argparse.Namespace:
    defaults = KTCSettings()
    parser = argparse.ArgumentParser(prog="ktc2023.py", description=__doc__.split("\n")[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("level", type=int)
    parser.add_argument("--mesh", default=defaults.mesh, choices=MESH_CHOICES)
    parser.add_argument("--mesh-root", default=None, help="folder with mesh/Mesh_{sparse,dense}.mat (--mesh sparse|dense)")
    parser.add_argument("--h0", type=float, default=defaults.h0, help="our mesh's size, in tank radii")
    parser.add_argument("--sigma0", default=str(defaults.sigma0), help="linearisation conductivity, or 'fit'")
    parser.add_argument("--contact-impedance", type=float, default=defaults.contact_impedance)
    parser.add_argument("--gauss-newton-steps", type=int, default=defaults.gauss_newton_steps)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a checkpoint trained on data=ktc2023_sim (docs/ktc_learned.md); default: the shipped one")
    parser.add_argument("--linearised", action="store_true",
                        help="the linearised difference baseline with the mesh and linearisation settings above "
                             "(they apply only with this flag) instead of a network")
    parser.add_argument("--segmentation", default=None, choices=SEGMENTATIONS,
                        help="networks only: Otsu on the change (otsu) or on log(sigma / sigma_bg) (log_otsu), or "
                             "the model's trained segmenter (learned); default: learned if the model has one, "
                             "else log_otsu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if not args.input_dir.is_dir():
        raise FileNotFoundError(f"INPUT_DIR {args.input_dir} is not a folder")
    ktc2023.removed_electrodes(args.level)  # checks LEVEL
    if not args.linearised:
        defaults = parse([str(args.input_dir), str(args.output_dir), str(args.level)])
        for option in LINEARISED_ONLY:
            if getattr(args, option) != getattr(defaults, option):
                raise ValueError(f"--{option.replace('_', '-')} applies to the linearised baseline: add --linearised")
    files = data_files(args.input_dir)
    if not files:
        raise FileNotFoundError(f"INPUT_DIR {args.input_dir} holds no dataN.mat file")
    sigma0 = args.sigma0 if args.sigma0 == "fit" else float(args.sigma0)
    settings = KTCSettings(args.mesh, args.h0, args.mesh_root, sigma0, args.contact_impedance,
                           args.gauss_newton_steps)
    start = time.perf_counter()
    ref = ktc2023.load_measurement(args.input_dir / "ref.mat")
    if args.linearised:
        reconstructor = KTCReconstructor(ref, settings)
    else:
        reconstructor = KTCLearnedReconstructor(args.model, args.input_dir / "ref.mat", args.segmentation)
    setup = time.perf_counter() - start
    data = np.stack([ktc2023.load_measurement(path)["uel"] for _, path in files])
    if data.shape[1] != ref["uel"].size:
        raise ValueError(f"INPUT_DIR: the data files have {data.shape[1]} voltages, ref.mat {ref['uel'].size}")
    labels = reconstructor.labels(data, args.level)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for (number, _), image in zip(files, labels):
        scipy.io.savemat(str(args.output_dir / f"{number}.mat"), {"reconstruction": image})
    total = time.perf_counter() - start
    method = "linearised difference baseline" if args.linearised else f"network {args.model}"
    print(f"level {args.level}: {len(files)} reconstructions ({method}) written to {args.output_dir} in {total:.1f} s "
          f"(setup {setup:.1f} s: mesh, Jacobian, prior; {reconstructor.n_elements} elements, sigma0 "
          f"{reconstructor.sigma0:.4g})")


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
