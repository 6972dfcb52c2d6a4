from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("contacts", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="Viewer",
            fields=[
                ("uid", models.CharField(max_length=128, primary_key=True, serialize=False)),
                ("since", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
