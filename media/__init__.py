"""Media plane: an SFU on aiortc that forwards RTP packets without decoding, with the RTCP work (PLI, NACK, REMB, SR)."""
