"""Turn the records of ``UNILORA_HF_CONFORMANCE_OUT=matrix.jsonl pytest tests/test_conformance.py`` into the
markdown matrix of docs/conformance.md: one row per architecture (and variant), the maximum absolute
output difference per direction."""

import json
import sys

DIRECTIONS = ["peft->here", "here->peft", "export->peft", "native", "merge"]


def table(path: str) -> str:
    rows = [json.loads(line) for line in open(path)]
    lines = ["| architecture | variant | " + " | ".join(DIRECTIONS) + " |", "|---|---|" + "---|" * len(DIRECTIONS)]
    for r in rows:
        cells = ["0" if r[d] == 0 else f"{r[d]:.1e}" for d in DIRECTIONS]
        lines.append(f"| {r['arch']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
