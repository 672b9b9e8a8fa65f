"""The offline demo's world: a tiny CLIP pretrained on a generated captioned world, and the generated GenImage-like
data the demo trains and evaluates on. Nothing outside the demo, the tests and the benchmarks needs it."""
