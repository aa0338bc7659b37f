"""Command line: `metacore check` (the derivations against finite differences)."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="metacore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check every gradient and Hessian-vector product "
                                     "against float64 central finite differences")
    p.add_argument("only", nargs="*", help="derivations to check (e.g. conv2d bn_mlp); "
                                           "default all")
    p.add_argument("--dtype", choices=["float64", "float32"], action="append",
                   help="only this dtype (repeatable); default both")
    p.add_argument("--list", action="store_true", help="list the derivations and exit")
    args = parser.parse_args(argv)
    if args.command == "check":
        from metacore import check
        if args.list:
            for case in check.all_cases():
                print(f"{case.name:<30} {case.kind}")
            return 0
        failures = check.run(args.only, tuple(args.dtype or ("float64", "float32")))
        return 1 if failures else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
