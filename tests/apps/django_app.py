"""A one-file Django app the HTTP tests serve unchanged (tests/test_http.py)."""

import django
from django.conf import settings

if not settings.configured:
    settings.configure(DEBUG=False, SECRET_KEY="test-only", ALLOWED_HOSTS=["*"],
                       ROOT_URLCONF=__name__, MIDDLEWARE=[])
    django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


def hello(request):
    return HttpResponse(f"Hello, {request.GET.get('name', 'world')} "
                        f"(priority {request.META['qstack.priority']})")


@csrf_exempt
def echo(request):
    return HttpResponse(request.body, content_type="text/plain")


urlpatterns = [path("hello/", hello), path("echo/", echo)]
application = get_wsgi_application()
