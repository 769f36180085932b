"""Rooms: pure state machines for sessions, waiting rooms, consultations and chat, plus their stores."""
