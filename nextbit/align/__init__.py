"""Learning from human feedback, the algorithms: SFT, reward models from pairwise comparisons, PPO with a KL leash,
DPO. Their data (formats, labelers, pairs) is prefs/; their shared training machinery, train/."""
