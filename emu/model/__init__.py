"""Pure torch modules of the Emu model (DESIGN.md): visual encoder, connector (mean pooling or
C-Former), the multimodal LM with its unified objective, the visual decoder, generation, and
save/load. No I/O beyond save/load and reading pretrained checkpoints (pretrained.py, sdxl.py,
inspection.py), no logging setup, no distributed initialisation."""
