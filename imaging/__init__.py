"""The image library: encoded bytes to an oriented BGR image (or a typed rejection), and the letterbox.

Pure (no I/O, no Kafka, no model store); the preprocess stage, the gateway's upload checks, the offline tools and
the benches use it. One module per concern, imported by name (this package re-exports nothing):

``imaging.limits``     rejection codes, ``ImageRejected``, ``ImageLimits``
``imaging.headers``    ``sniff_format``, ``read_header`` (size, orientation, limits before any pixel),
                       ``check_complete``
``imaging.exif``       the bounds-checked TIFF/EXIF structure reader and the EXIF orientation
``imaging.decode``     ``decode``, ``apply_orientation`` and ``prepare`` (the whole chain, timed)
``imaging.letterbox``  ``letterbox_region``, ``place``, ``letterbox``, ``to_model_input``
"""
