"""The ladder of configurations a pack is served along: level k = its first k rungs.

A configuration says, for every decoder layer, which precision it computes in. A rung
moves one layer one tier down (bf16 -> W8A8, W8A8 -> W4A16, or bf16 -> W4A16 in a pack
without tiers) and frees the bytes between the two. With tiers the ladder is every layer
to W8A8 in the W8A8 order, then every layer to W4A16 in the W4A16 order: per byte freed,
a W8A8 rung costs far less quality than a W4A16 one (prepare measures the whole ladder and
records whether that held; docs/POLICIES.md), so the cheapest configuration for a given
capacity lies on it. A level is therefore still one integer, and every layer is wholly in
one tier at every level. Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphserve.offline.pack import BASE_TIER, Manifest

BF16 = "bf16"
RANK = {BF16: 0, "w8a8": 1, "w4a16": 2}  # how compressed: a higher rank frees more (= swappable.TIER_RANK)


@dataclass(frozen=True)
class Rung:
    layer: int
    tier: str
    saving: int  # bytes this rung frees


@dataclass(frozen=True)
class LadderPlan:
    compress: list[tuple[int, str]]  # (layer, tier), in ladder order
    decompress: list[tuple[int, str]]  # (layer, tier it returns to), last rung first


class Ladder:
    def __init__(self, rungs: list[Rung]):
        self.rungs = list(rungs)
        self._configs = [{}]
        for r in self.rungs:
            self._configs.append({**self._configs[-1], r.layer: r.tier})

    @classmethod
    def from_manifest(cls, manifest: Manifest, tiers: list[str] | None = None,
                      held: dict[str, list[int]] | None = None) -> "Ladder":
        """The ladder over the pack's tiers, or over `tiers` only (those this CPU serves):
        each served tier's layers in its own order, least compressed tier first. `held`
        replaces a tier's per-layer bytes (bf16's too) with what the serving kernel really holds."""
        served = [t for t in manifest.tier_names if tiers is None or t in tiers]
        if not served:
            raise ValueError(f"none of the tiers {tiers} is in this pack (it has {', '.join(manifest.tier_names)})")
        previous = {b.layer: b.fp16 for b in manifest.layer_bytes}
        share = {i: 1.0 for i in previous}
        if (held or {}).get("bf16"):  # one rank's shard under tensor parallelism
            share = {i: b / previous[i] for i, b in enumerate(held["bf16"])}
            previous = dict(enumerate(held["bf16"]))
        rungs = []
        for name in served:
            tier = manifest.tier(name)
            # a tier whose held bytes are not reported takes the rank's share of the pack's
            now = dict(enumerate((held or {}).get(name) or [round(b * share[i]) for i, b in enumerate(tier.layer_bytes)]))
            rungs += [Rung(i, name, previous[i] - now[i]) for i in tier.swap_order]
            previous = now
        return cls(rungs)

    @property
    def top(self) -> int:
        return len(self.rungs)

    @property
    def savings(self) -> list[int]:
        return [r.saving for r in self.rungs]

    @property
    def tiered(self) -> bool:
        """More than one quantized tier on this ladder."""
        return len(self.tier_names) > 1

    @property
    def tier_names(self) -> list[str]:
        return list(dict.fromkeys(r.tier for r in self.rungs))

    def config(self, level: int) -> dict[int, str]:
        """layer -> tier at `level` (a layer not listed is bf16)."""
        return dict(self._configs[level])

    def counts(self, level: int) -> dict[str, int]:
        """How many layers compute in each tier at `level`."""
        out: dict[str, int] = {}
        for tier in self._configs[level].values():
            out[tier] = out.get(tier, 0) + 1
        return out

    def level_of(self, config: dict[int, str]) -> int | None:
        """The level whose configuration this is; None off the ladder."""
        clean = {layer: tier for layer, tier in config.items() if tier != BF16}
        for level, c in enumerate(self._configs):
            if c == clean:
                return level
        return None

    def nearest_level(self, config: dict[int, str]) -> int:
        """The highest level every layer of `config` is at least as compressed as: where
        a partial state (a restore stopped half-way) is accounted from, so the KV pool is
        never sized for more memory than the layers have freed."""
        def covered(c: dict[int, str]) -> bool:
            return all(RANK[config.get(layer, BF16)] >= RANK[tier] for layer, tier in c.items())

        return max(level for level, c in enumerate(self._configs) if covered(c))

    def plan(self, current: dict[int, str], level: int) -> LadderPlan:
        """Compressions ordered by the rung they reach, decompressions by the rung they
        leave, last first: a plan between two levels passes through the rungs between."""
        target = self._configs[level]
        compress, decompress = [], []
        for layer in set(current) | set(target):
            have, want = current.get(layer, BF16), target.get(layer, BF16)
            if RANK[want] > RANK[have]:
                compress.append((self._rung_of(layer, want), (layer, want)))
            elif RANK[want] < RANK[have]:
                decompress.append((self._rung_of(layer, have), (layer, want)))
        return LadderPlan([m for _, m in sorted(compress)], [m for _, m in sorted(decompress, reverse=True)])

    def _rung_of(self, layer: int, tier: str) -> int:
        for k, r in enumerate(self.rungs):
            if r.layer == layer and r.tier == tier:
                return k
        raise ValueError(f"layer {layer} has no {tier} rung on this ladder")


def level_ppl_curve(quality: dict) -> dict[int, float]:
    """Perplexity at every level of a pack: the ladder's (quality.json `ladder.ppl`) with
    tiers, else the base tier's swap order (`orders.lis.ppl`). One reader for the policies
    and the evaluation alike."""
    from policies.config import quality_curve

    return quality_curve(quality, "the evaluation")


def served_quality(quality: dict | None, pack_tiers: list[str], served: list[str]) -> dict | None:
    """quality.json as the served ladder sees it: unchanged when every tier of the pack is
    served; when a CPU serves only some, the curve of those rungs (W8A8 alone: the tiered
    ladder's first half, `tiers.w8a8.ppl`; W4A16 alone: `orders.lis.ppl`), in the shape the
    policy and the evaluation read (`orders.lis.ppl`)."""
    if quality is None or list(served) == list(pack_tiers):
        return quality
    if list(served) == [BASE_TIER]:
        from policies.config import dearer_fill

        curve = {str(k): v for k, v in dearer_fill(quality["orders"]["lis"]["ppl"]).items()}
    elif list(served) == ["w8a8"]:
        curve = quality["tiers"]["w8a8"]["ppl"]
    else:
        raise ValueError(f"no quality curve for serving {served} of a pack with {pack_tiers}")
    return {**{k: v for k, v in quality.items() if k not in ("ladder", "tiers", "orders")},
            "orders": {"lis": {"ppl": dict(curve)}}, "served_tiers": list(served)}



def with_prompt_twins(quality: dict, layers: int, min_tokens: int | None = None) -> dict:
    """quality.json marked for a server holding prompt twins for the ladder's first `layers`
    layers, computing steps of at least `min_tokens` tokens (policies.config.charged_level
    reads the mark)."""
    mark = {"layers": int(layers)} if min_tokens is None else {"layers": int(layers), "min_tokens": int(min_tokens)}
    return {**quality, "prompt_twins": mark}
