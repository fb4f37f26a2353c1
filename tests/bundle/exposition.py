"""Read the metric families and sample names of a Prometheus text exposition."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Exposition", "parse_exposition"]


@dataclass(frozen=True)
class Exposition:
    types: dict[str, str]
    """family name as in `# TYPE` -> type (counters keep `_total` here)."""
    samples: frozenset[str]
    """names of the sample lines."""
    labels: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    """sample name -> the label names of each of its sample lines."""

    def exports(self, name: str) -> bool:
        """True when a query for `name` can match: a sample or a declared family.

        A labelled family with no child yet shows only its TYPE line; histogram series
        are declared through their family.
        """
        if name in self.samples or name in self.types:
            return True
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return True
        return False


def parse_exposition(text: str) -> Exposition:
    types: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            samples.add(line.split("{", 1)[0].split(" ", 1)[0])
    labels: dict[str, list[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, []).append(tuple(sorted(sample.labels)))
    return Exposition(types, frozenset(samples), labels)
