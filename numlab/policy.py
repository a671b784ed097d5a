"""Precision policies: ordered rules `GLOB.field=value` that set the precision of every op site.

A site is a named op of the forward pass (`blk.7.ffn_down_exps`, `output_norm`, ...) of some kind;
each kind has fields (KINDS) with defaults (DEFAULTS). A rule's glob (fnmatch, case-sensitive; `*`
also matches dots) selects sites; it sets `field` on the selected sites whose kind has that field.
`@<format>` in place of the glob selects the matvec sites whose weights are in that format
(`@q8_0.act=q8_0`); it needs the model's weight formats and leaves a model without such weights
unchanged. Later rules win. Text form: rules joined by `;` (newlines also separate rules).
"""
import dataclasses
import fnmatch
import json
import re

from numlab.formats import FORMATS
from numlab.ops import acts_for
from numlab.ops.precision import ACCS, ACTS, DTYPES, EXPS, ORDERS

VALUES = {"act": ACTS, "acc": ACCS, "dtype": DTYPES, "order": ORDERS, "exp": EXPS}
DEFAULTS = {"act": "f32", "acc": "f32", "dtype": "f32", "order": "xla", "exp": "exp"}
KINDS = {
    "matvec": ("act", "acc"),
    "norm": ("dtype", "order"),
    "softmax": ("dtype", "order"),
    "silu": ("dtype", "exp"),
    "rope": ("dtype",),
    "attention": ("dtype", "order"),
    "moe_sum": ("dtype", "order"),
    "add": ("dtype",),
}
_RULE = re.compile(r"^(?P<pattern>[^\s=;]+)\.(?P<field>[a-z_]+)=(?P<value>[a-z0-9_]+)$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Set `field` to `value` on the sites whose name matches the glob `pattern`."""

    pattern: str
    field: str
    value: str

    def __post_init__(self):
        if not self.pattern or any(c in self.pattern for c in " \t\n=;"):
            raise ValueError(f"bad site glob {self.pattern!r}: it must be non-empty, without spaces, '=' or ';'")
        if self.field not in VALUES:
            raise ValueError(f"unknown field {self.field!r} in rule {self}; valid fields: {', '.join(VALUES)}")
        if self.value not in VALUES[self.field]:
            raise ValueError(f"unknown value {self.value!r} for field {self.field!r} in rule {self}; "
                             f"valid: {', '.join(VALUES[self.field])}")
        if self.weight_format is not None:
            if self.weight_format not in FORMATS:
                raise ValueError(f"unknown weight format {self.weight_format!r} in rule {self}; valid after '@': "
                                 f"{', '.join(FORMATS)}")
            if self.field not in KINDS["matvec"]:
                raise ValueError(f"rule {self}: an @format rule sets matvec fields ({', '.join(KINDS['matvec'])}), "
                                 f"not {self.field!r}")

    @property
    def weight_format(self):
        """The format of an `@<format>` rule, else None."""
        return self.pattern[1:] if self.pattern.startswith("@") else None

    def __str__(self):
        return f"{self.pattern}.{self.field}={self.value}"


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered tuple of rules (later rules win); hashable, so usable as a static jit argument."""

    rules: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Policy rules must be Rule objects, got {type(r).__name__}: {r!r}")

    def __str__(self):
        return "; ".join(str(r) for r in self.rules)

    def resolve(self, sites: dict, formats: dict | None = None) -> dict:
        """{site: {field: value}} for every site of `sites` ({name: kind}). `formats` ({matvec site: weight
        format}) checks each `act` against what qmatvec supports for that format and lets `@<format>` rules
        apply. ValueError on a glob matching no site, a rule whose field no matched site has, or an act
        invalid for a format."""
        for name, kind in sites.items():
            if kind not in KINDS:
                raise ValueError(f"site {name!r} has unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        out = {name: {f: DEFAULTS[f] for f in KINDS[kind]} for name, kind in sites.items()}
        for rule in self.rules:
            if rule.weight_format is not None:
                for n, fmt in (formats or {}).items():
                    if fmt == rule.weight_format:
                        out[n][rule.field] = rule.value
                continue
            matched = [n for n in sites if fnmatch.fnmatchcase(n, rule.pattern)]
            if not matched:
                raise ValueError(f"rule {rule}: glob {rule.pattern!r} matches no site; valid sites: "
                                 f"{describe_sites(sites)}")
            hit = [n for n in matched if rule.field in KINDS[sites[n]]]
            if not hit:
                fields = "; ".join(f"{k}: " + ", ".join(KINDS[k]) for k in sorted({sites[n] for n in matched}))
                raise ValueError(f"rule {rule}: field {rule.field!r} applies to none of the {len(matched)} "
                                 f"sites it matches (their fields by kind: {fields})")
            for n in hit:
                out[n][rule.field] = rule.value
        for name, fmt in (formats or {}).items():
            act = out[name]["act"]
            if act not in acts_for(fmt):
                raise ValueError(f"policy {self}: site {name!r} has {fmt} weights, which act={act!r} does "
                                 f"not apply to; valid acts for {fmt}: {', '.join(acts_for(fmt))}")
        return out

    def to_json(self) -> str:
        """JSON text {"rules": [{"pattern", "field", "value"}, ...]}."""
        return json.dumps({"rules": [dataclasses.asdict(r) for r in self.rules]})

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        """Inverse of to_json."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise ValueError(f"policy JSON must be an object with a 'rules' list, got {text[:200]!r}")
        return cls(tuple(Rule(**r) for r in data["rules"]))


def describe_sites(sites: dict) -> str:
    """Site names compactly: per-layer names as blk.{first..last}.{name, ...}, then the others."""
    layers, per_layer, other = set(), [], []
    for n in sites:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", n)
        if m:
            layers.add(int(m.group(1)))
            if m.group(2) not in per_layer:
                per_layer.append(m.group(2))
        else:
            other.append(n)
    parts = [f"blk.{{{min(layers)}..{max(layers)}}}.{{{', '.join(per_layer)}}}"] if layers else []
    return ", ".join(parts + other)


def parse(text: str) -> Policy:
    """Policy from `GLOB.field=value; ...` (also newline-separated; blank entries ignored)."""
    rules = []
    for part in re.split(r"[;\n]", text):
        part = part.strip()
        if not part:
            continue
        m = _RULE.match(re.sub(r"\s*=\s*", "=", part))
        if not m:
            raise ValueError(f"bad policy rule {part!r}: expected GLOB.field=value with field one of "
                             f"{', '.join(VALUES)} (e.g. 'blk.4[0-7].router_softmax.dtype=f64')")
        rules.append(Rule(m["pattern"], m["field"], m["value"]))
    return Policy(tuple(rules))


PRESETS = {
    "ref-f64": parse("*.act=f64; *.acc=f64; *.dtype=f64"),
    "f32": parse("*.act=f32; *.acc=f32; *.dtype=f32"),
    "bf16": parse("*.act=bf16; *.dtype=bf16"),
    # ggml's CPU quantizes activations to its type's vec_dot_type: Q8_K for k-quants, Q8_0 for Q8_0, the
    # weight's own type for f16/bf16/f32. llama.cpp's CUDA MMVQ uses Q8_1 for every quantized type and
    # keeps float32 activations for float weights.
    "ggml-cpu": parse("*.act=q8_k; @q8_0.act=q8_0; @f16.act=f16; @bf16.act=bf16; @f32.act=f32; "
                      "*.ffn_gate_inp.act=f32"),
    "ggml-cuda": parse("*.act=q8_1; @f16.act=f32; @bf16.act=f32; @f32.act=f32; *.ffn_gate_inp.act=f32"),
}


def get(spec) -> Policy:
    """A Policy as is, or from text whose `;`-separated entries are rules or preset names (PRESETS),
    e.g. "ggml-cpu; blk.47.router_softmax.dtype=f64" (a preset's rules in its place, later entries win)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"policy must be a Policy, a preset name or rule text, got {type(spec).__name__}")
    rules = []
    for part in re.split(r"[;\n]", spec):
        part = part.strip()
        if part in PRESETS:
            rules.extend(PRESETS[part].rules)
        elif "=" not in part and part:
            raise ValueError(f"unknown policy preset {part!r}; presets: {', '.join(PRESETS)} "
                             "(or rules GLOB.field=value)")
        else:
            rules.extend(parse(part).rules)
    return Policy(tuple(rules))
