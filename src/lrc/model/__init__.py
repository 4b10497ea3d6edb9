"""The student as a function of the frozen teacher: families, precision, weight generation, the clone, its
losses, the teacher loaded, and the student written out as an ordinary model."""
