"""What outlives a click: the interaction log (SQLite, or PostgreSQL for replicas) and the dataset writers
(COCO, PNG, YOLO, crops)."""
