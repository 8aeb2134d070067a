"""The article's models (../shared/seeds) written exactly as the article writes them: the
``super(Cls, self).__init__()`` calls, one statement per layer in ``forward``, the LSTM model
with no BN at all. ``tests.models`` has tidied versions; these are the real user code."""

# ruff: noqa: UP008
import torch.nn as nn


class SimpleCNN(nn.Module):
    def __init__(self):
        super(SimpleCNN, self).__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        return x


# Define a simple model with BatchNorm1d after a Linear layer
class SimpleMLP(nn.Module):
    def __init__(self):
        super(SimpleMLP, self).__init__()
        self.fc = nn.Linear(10, 5)
        self.bn = nn.BatchNorm1d(5)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.fc(x)
        x = self.bn(x)  # Apply BatchNorm1d after the linear layer
        x = self.relu(x)
        return x


def sequential():
    """The article's ``model = nn.Sequential(...)``, as a factory the CLI can name."""
    model = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, kernel_size=3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 10),
    )
    return model


class RNNWithLayerNorm(nn.Module):
    def __init__(self, input_size, hidden_size):
        super(RNNWithLayerNorm, self).__init__()
        self.rnn = nn.LSTM(input_size, hidden_size)
        self.ln = nn.LayerNorm(hidden_size)

    def forward(self, x):
        output, _ = self.rnn(x)
        output = self.ln(output)
        return output


# Model with BatchNorm
class CIFAR10Model(nn.Module):
    def __init__(self):
        super(CIFAR10Model, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return x


def freeze_as_the_article_does(model):
    """The article's "Freeze BatchNorm layers" loop (which ``model.train()`` undoes)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()  # Set to evaluation mode
            module.weight.requires_grad = False
            module.bias.requires_grad = False
    return model
