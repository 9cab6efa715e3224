"""From raw records to events: the schema and decoder, names, filters, counter-derived kinds, attribution."""
