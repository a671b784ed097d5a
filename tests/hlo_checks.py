"""Checks on compiled HLO text shared by tests."""
import re


def rounding_pairs(hlo: str) -> list:
    """Instructions of compiled HLO text converting back to float32 a bf16/f16 value converted from
    float32: the pairs XLA:GPU removes, rounding and all, when allowed excess precision (its default)."""
    dtypes = dict(re.findall(r"%?([\w.-]+)(?: =|:) (\w+)\[", hlo))
    converts = {name: (dt, arg) for name, dt, arg in
                re.findall(r"%([\w.-]+) = (\w+)\[[^\]]*\]\S* convert\(%([\w.-]+)\)", hlo)}
    return [name for name, (dt, arg) in converts.items()
            if dt == "f32" and arg in converts and converts[arg][0] in ("bf16", "f16")
            and dtypes.get(converts[arg][1]) == "f32"]
