"""Operations: metrics and capacity signals, the access log, the admin and status pages; imports
the core, the fleet and the engine.
"""
