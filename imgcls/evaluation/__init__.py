"""Evaluation: how good a model is, why it decides as it does, and whether it still holds.

In: a model and labelled images, or predictions tables. ``evaluate`` labels through
the inference pipeline and scores with ``metrics`` (accuracy, precision, recall and F1
per class and macro, the confusion matrix); ``report`` writes metrics.json, PNG plots and
report.html; ``explain`` draws Grad-CAM heatmaps; ``review`` picks the predictions a
person should check first; ``monitor`` compares a labelling run with a reference for
drift. Out: files in an output folder.
"""
