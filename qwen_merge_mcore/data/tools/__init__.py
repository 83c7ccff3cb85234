"""Data preparation behind `qmm data`: convert public dataset layouts, render text questions to images."""
