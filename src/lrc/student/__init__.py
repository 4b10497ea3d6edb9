"""The student's shape and starting point: size targets, channel and layer selection, initialisation and
refit, the baselines' students."""
