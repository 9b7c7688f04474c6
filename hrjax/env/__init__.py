"""The routing MDP: response cache, environment and path trees."""
