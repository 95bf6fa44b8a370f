"""Detection on images as a user has them: :class:`dino.predict.detector.Detector` (the Python API, ``dino.Detector``)
and ``dino predict`` (:mod:`dino.predict.files`: predictions.json and pictures), one code path.

Modules: ``images`` (images read as a viewer shows them), ``preprocess`` (``dino eval``'s resize and padding),
``backend`` (the backend interface; PyTorch models), ``labels`` (label names, the class metadata of exported
artifacts), ``draw`` (pictures of detections), ``paths`` (which files ``dino predict`` reads and where it may write),
``files`` (``dino predict``'s outputs).
"""
