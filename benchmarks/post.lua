-- wrk script: POST a fixed request body read from a file.
-- Usage: wrk ... -s benchmarks/post.lua URL -- /path/to/body [JSON_HEADER_LENGTH]
-- With a header length the body is sent as a V2 binary-extension request.

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local body = f:read("*a")
   f:close()
   return body
end

wrk.method = "POST"

function init(args)
   local path = args[1] or os.getenv("WRK_BODY_FILE")
   assert(path, "pass the body file after '--' or set WRK_BODY_FILE")
   wrk.body = read_file(path)
   if args[2] then
      wrk.headers["Content-Type"] = "application/octet-stream"
      wrk.headers["Inference-Header-Content-Length"] = args[2]
   else
      wrk.headers["Content-Type"] = "application/json"
   end
end
