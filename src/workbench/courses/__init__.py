"""Courses: material pulled into students' homes, the materials folder, roster files and course links."""
