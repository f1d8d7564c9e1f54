"""Draft sources. A drafter never touches the model; it only proposes DraftTrees."""
