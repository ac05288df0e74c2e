"""What outlives a click: the interaction log (SQLite) and the dataset writers (COCO, PNG, YOLO, crops)."""
