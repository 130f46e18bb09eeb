"""Using a trained model: validation loss, multiple-choice accuracy and sampling."""
