"""hybridpd.demo: random-weight Nemotron-H checkpoints (presets, writer, tokenizer files).

Heavy imports (torch) happen in the submodules only; import what you need from them, e.g.
`from hybridpd.demo.embedded import embedded_model_dir`.
"""
