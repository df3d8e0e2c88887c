"""Label texts (names, clinical descriptions) and the sentence encoders that embed them."""
