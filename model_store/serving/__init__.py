"""What a serving process runs: sessions, model configs, decoders, boxes, routing, the catalog and the ModelPool."""
