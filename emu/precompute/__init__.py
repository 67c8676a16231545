"""Embedding and latent precompute with the frozen encoder (Emu2 §2.2.2-§2.3: stage 2, decoder
training and instruction tuning all keep the visual encoder frozen).

    config.py    PrecomputeConfig (the `precompute` preset section)
    content.py   content addresses, fingerprints, the output layout (no Ray)
    encoder.py   the encoder without the LM, and the decoder's VAE (no Ray)
    job.py       run_precompute: the Ray Data job (the platform's only Ray import)
    store.py     PrecomputedStore, embedding_lookup, latent_lookup: what training reads (no Ray)

Nothing is imported here, so `import emu.precompute.store` never loads Ray.
"""
