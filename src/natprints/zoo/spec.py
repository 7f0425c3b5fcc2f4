"""Model specs and the conditions that group them: which models a config asks for, and their ids."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from natprints.config import CONDITIONS, STRING_CONDITIONS, Config, SizePreset


class ModelSpec(BaseModel):
    """Everything that determines a trained model: size, seeds, optimizer settings, steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: str
    arch: str = "llama"
    tokenizer: str = "run"  # the run's tokenizer, or a zoo tokenizer variant (``bpe-<n>``, ``unigram-<n>``)
    init_seed: int
    data_seed: int
    lr: float
    batch_size: int
    seq_len: int
    steps: int
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    min_lr_ratio: float
    schedule: str
    grad_clip: float
    eval_every: int
    eval_batches: int
    checkpoint_steps: tuple[int, ...]
    resume_every: int

    @property
    def model_id(self) -> str:
        lr = format_lr(self.lr)
        family = "" if self.arch == "llama" else f"{self.arch}-"  # Llama ids predate the arch factor
        tokens = "" if self.tokenizer == "run" else f"{self.tokenizer}-"
        return f"{tokens}{family}{self.size}-lr{lr}-bs{self.batch_size}-init{self.init_seed}-data{self.data_seed}"

    @property
    def own_tokenizer(self) -> bool:
        """The model reads text with a tokenizer of its own, not the run's."""
        return self.tokenizer != "run"


def format_lr(lr: float) -> str:
    """1e-3 -> '1e-3', 0.0025 -> '2.5e-3': short, stable and readable in model ids."""
    mantissa, exponent = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def base_spec(cfg: Config) -> ModelSpec:
    t = cfg.train
    return ModelSpec(
        **t.model_dump(exclude={"checkpoint_steps"}),
        checkpoint_steps=tuple(sorted(set(t.checkpoint_steps))),
    )


def zoo_specs(cfg: Config) -> dict[str, tuple[ModelSpec, list[str]]]:
    """Every model the config asks for: id -> (spec, the conditions it belongs to).

    Each condition is the base model plus the variants that differ from it in that one factor; a
    model that two conditions share (the base, always) is trained once.
    """
    base = base_spec(cfg)
    variants: dict[str, list[ModelSpec]] = {
        "seed": [base.model_copy(update={"init_seed": s, "data_seed": s}) for s in cfg.conditions.seed],
        "init": [base.model_copy(update={"init_seed": s}) for s in cfg.conditions.init],
        "data_order": [base.model_copy(update={"data_seed": s}) for s in cfg.conditions.data_order],
        "size": [base.model_copy(update={"size": s}) for s in cfg.conditions.size],
        "lr": [base.model_copy(update={"lr": v}) for v in cfg.conditions.lr],
        "batch_size": [base.model_copy(update={"batch_size": v}) for v in cfg.conditions.batch_size],
        "arch": [base.model_copy(update={"arch": a}) for a in cfg.conditions.arch if a != base.arch],
        "tokenizer": [base.model_copy(update={"tokenizer": t}) for t in cfg.conditions.tokenizer],
        "families": [
            base.model_copy(update=dict(zip(("arch", "tokenizer"), f.split("/"), strict=True)))
            for f in cfg.conditions.families
        ],
    }
    out: dict[str, tuple[ModelSpec, list[str]]] = {base.model_id: (base, [])}
    for condition in CONDITIONS:
        if not variants[condition]:
            continue
        for spec in [base, *variants[condition]]:
            out.setdefault(spec.model_id, (spec, []))[1].append(condition)
    return out


def condition_members(cfg: Config) -> dict[str, list[str]]:
    """Condition -> model ids (base first), plus ``all`` unless one condition already holds every model;
    only conditions the config declares whose texts are the run's tokens (not :func:`string_members`)."""
    specs = zoo_specs(cfg)
    members: dict[str, list[str]] = {}
    for model_id, (_, conditions) in specs.items():
        for condition in conditions:
            members.setdefault(condition, []).append(model_id)
    ordered = {c: members[c] for c in CONDITIONS if c in members and c not in STRING_CONDITIONS}
    everyone = list(dict.fromkeys(m for ids in ordered.values() for m in ids))  # not string conditions' models
    if len(everyone) > 1 and all(set(m) != set(everyone) for m in ordered.values()):
        ordered["all"] = everyone
    return ordered


def string_members(cfg: Config) -> dict[str, list[str]]:
    """The conditions whose models read text with tokenizers of their own (base first): their texts
    are cut to the character budget and scored as strings."""
    members: dict[str, list[str]] = {}
    for model_id, (_, conditions) in zoo_specs(cfg).items():
        for condition in conditions:
            if condition in STRING_CONDITIONS:
                members.setdefault(condition, []).append(model_id)
    return members


def resolve_condition(members: dict[str, list[str]], name: str) -> str:
    """``name``, or for ``all`` when a run lists no separate one, the condition that holds every model."""
    if name in members or name != "all":
        return name
    everyone = {m for ids in members.values() for m in ids}
    return next((c for c, ids in members.items() if set(ids) == everyone), name)


def size_preset(cfg: Config, spec: ModelSpec) -> SizePreset:
    return cfg.sizes[spec.size]


def linear_weights(cfg: Config, spec: ModelSpec) -> int:
    """Weights of the model's linear maps, LM head included: its cost per token, up to a constant.

    The same for every architecture at one size: their MLPs are sized to match (see ``zoo.train``).
    """
    p = size_preset(cfg, spec)
    per_layer = 4 * p.hidden_size**2 + 3 * p.hidden_size * p.intermediate_size
    vocab = int(spec.tokenizer.split("-")[1]) if spec.own_tokenizer else cfg.tokenizer.vocab_size
    return p.num_layers * per_layer + p.hidden_size * vocab
