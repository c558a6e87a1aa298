
return (apply_item(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[2],
                   tonumber(ARGV[3]), 4))
