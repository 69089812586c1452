"""The shape world: procedural scenes with captions, their renderer and edge maps, and a scorer
that judges generated images against prompts, controls and styles (issue: a small trained model)."""
