"""Convert an authors' released checkpoint (github.com/qihao067/DiMR) to one of ours.

    python -m tools.convert DiMR-XL-2R.pth dimr_xl_2r.pt --heads 16

support/checkpoints.py's from_official infers every size from the tensor shapes (branches, widths,
depths, patch sizes, classes) and renames the release's keys to ours; the head count is the one
size the shapes do not hold. The result carries its config, so sample.py needs no further flags.
"""
import dataclasses

from support import checkpoints, distributed
from support.cli import Parser, number


def run(args):
    model = checkpoints.from_official(checkpoints.load(args.src), args.heads)
    sd = model.state_dict()
    checkpoints.save({"config": dataclasses.asdict(model.config), "model": sd, "ema": sd},
                     args.dst)
    print(f"wrote {args.dst}: {sum(v.numel() for v in sd.values()):,} parameters, "
          f"config {model.config}")


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the release's .pth (a state_dict)")
    p.add_argument("dst", help="output checkpoint (.pt) for sample.py")
    p.add_argument("--heads", type=number(int, 1), required=True,
                   help="attention heads (16 for XL and G)")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
