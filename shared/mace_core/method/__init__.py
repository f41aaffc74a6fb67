"""Stage 1 (closed-form refinement and its priors), stage 2 (masks, LoRA training, objectives), stage 3 (fusion) and hardening: plain data in, plain data out."""
