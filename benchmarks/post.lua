-- wrk script: POST a fixed JSON body read from a file.
-- Usage: wrk ... -s benchmarks/post.lua URL -- /path/to/body.json
-- (or set WRK_BODY_FILE instead of passing the path after "--").

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local body = f:read("*a")
   f:close()
   return body
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
   local path = args[1] or os.getenv("WRK_BODY_FILE")
   assert(path, "pass the body file after '--' or set WRK_BODY_FILE")
   wrk.body = read_file(path)
end
