"""Pantheon's kernel: the small pieces every app builds on (API error bodies and
pagination, money formatting, database calls from async code, storable text, periodic
tasks). It imports no app; the apps import it; the project root (`pantheon/`) sits on top.
"""
