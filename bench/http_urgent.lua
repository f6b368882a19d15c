-- bench/http_wsgi.py --priority: each urgent connection waits 100 ms between requests
function delay()
  return 100
end
