"""Ray actors: rollout generator, verifier pool, replay buffer, learner."""
