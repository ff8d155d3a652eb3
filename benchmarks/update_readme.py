"""Put benchmark output into the README: replaces what stands between

    <!-- NAME:begin -->
    <!-- NAME:end -->

with the given markdown files (tables written by kv_bench.py, generate_bench.py, ...)
and, optionally, an image, so README figures are copied from measurements, never typed.

    python benchmarks/update_readme.py kv_bench benchmarks/results/kv_b1.md \\
        --plot benchmarks/results/kv_b1.png
"""

import argparse
import os
import re


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the lines between NAME's begin and end markers replaced by `body`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"the README needs exactly one '{begin}' ... '{end}' block")
    return pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the marker name in the README")
    parser.add_argument("tables", nargs="+", help="markdown files, inserted in this order")
    parser.add_argument("--plot", help="an image to show under the tables")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()

    parts = []
    for path in args.tables:
        with open(path) as f:
            parts.append(f"From `{path}`:\n\n{f.read().strip()}")
    if args.plot:
        rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.readme)))
        parts.append(f"![{args.name}]({rel})")
    with open(args.readme) as f:
        text = f.read()
    with open(args.readme, "w") as f:
        f.write(replace_section(text, args.name, "\n\n".join(parts)))


if __name__ == "__main__":
    main()
