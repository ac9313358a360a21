"""mae-lab: declarative ablation studies for Masked Autoencoders."""
