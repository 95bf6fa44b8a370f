"""Pictures of a run drawn with matplotlib (Agg, no display): ``curves.png`` (losses, learning rate, AP, per-category
AP; :mod:`dino.plots.curves`) and ``pr_curves.png`` (precision against recall; :mod:`dino.plots.pr_curves`)."""
