"""`mmalign demo`: the ShapeWorld demos (diffusion, vision-language, video) and their evaluator pass."""
