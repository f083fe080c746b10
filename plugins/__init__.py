"""quantfmt's built-in formats, one module per format (installed as `quantfmt_formats`).

Every module here is a plugin, loaded through the same `register_formats` hook as
third-party ones; modules whose name starts with "_" are shared helpers, not plugins.

MANIFEST says which names (tags and aliases) each module registers, so the registry imports
only the modules a command needs (see quantfmt/plugins.py). A new format module adds its line;
tests/test_registry.py checks the manifest against what the modules really register.
"""

MANIFEST: dict[str, tuple[str, ...]] = {
    "ggml_dequant": ("I1_S", "I1_M", "I2XX", "I2XS", "I2_S", "I3XX", "I3_S", "TQ10", "TQ20", "NVF4",
                     "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "NVFP4"),
    "iq4_nl": ("IQ4N", "IQ4_NL"),
    "iq4_xs": ("IQ4X", "IQ4_XS"),
    "mxfp4": ("MXF4", "MXFP4"),
    "plain": ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"),
    "q2_k": ("Q2_K",),
    "q3_k": ("Q3_K",),
    "q4_0": ("Q4_0",),
    "q4_1": ("Q4_1",),
    "q4_a": ("Q4_A",),
    "q4_k": ("Q4_K",),
    "q5_0": ("Q5_0",),
    "q5_1": ("Q5_1",),
    "q5_k": ("Q5_K",),
    "q6_k": ("Q6_K",),
    "q8_0": ("Q8_0",),
    "q8_a": ("Q8_A",),
    "q8_b": ("Q8_B",),
}
