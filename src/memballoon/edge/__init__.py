"""The edge shared by the real worlds: the real clock, the journal file, the asyncio shell."""
