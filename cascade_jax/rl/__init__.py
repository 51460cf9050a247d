"""Reinforcement learning: pure GRPO/MOPD losses, rewards, rollouts and the GRPO stage loop."""
