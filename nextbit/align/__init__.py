"""Learning from human feedback: SFT, reward models from pairwise comparisons, PPO with a KL leash, DPO, labelers."""
